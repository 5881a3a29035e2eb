"""Algorithms: one file each (see algorithms/base.py), one registry line each."""

from ..registry import Registry

ALGORITHMS = Registry("algorithm")
ALGORITHMS.add("allreduce", "relaxsgd.algorithms.allreduce:AllReduceSGD",
               "synchronous all-reduce SGD: gradient mean every step (large-batch SGD)")
ALGORITHMS.add("localsgd", "relaxsgd.algorithms.localsgd:LocalSGD",
               "Local SGD: p local steps, then a blocking model average")
ALGORITHMS.add("olco3", "relaxsgd.algorithms.olco3:OLCO3",
               "OLCO3: local SGD whose compressed aggregation overlaps s rounds, compensated")
ALGORITHMS.add("efsgd", "relaxsgd.algorithms.efsgd:EFSGD",
               "EF-SGD: all-reduce SGD with any compressor and error feedback")
ALGORITHMS.add("qsparse", "relaxsgd.algorithms.qsparse:QsparseLocalSGD",
               "Qsparse-local-SGD: p local steps, then a compressed average with error feedback")
ALGORITHMS.add("pipesgd", "relaxsgd.algorithms.pipesgd:PipeSGD",
               "Pipe-SGD: all-reduce SGD whose gradient of step t is applied at step t + s")
ALGORITHMS.add("cocod", "relaxsgd.algorithms.cocod:CoCoDSGD",
               "CoCoD-SGD: round-start models averaged during the round's local steps")
ALGORITHMS.add("overlap-local", "relaxsgd.algorithms.overlap_local:OverlapLocalSGD",
               "Overlap-Local-SGD: pull to a stale anchor averaged in the background")
ALGORITHMS.add("diloco", "relaxsgd.algorithms.diloco:DiLoCo",
               "DiLoCo: Local SGD whose averaged update drives an outer Nesterov optimizer")
ALGORITHMS.add("streaming-diloco", "relaxsgd.algorithms.diloco:StreamingDiLoCo",
               "Streaming DiLoCo: DiLoCo by fragments, outer step tau steps late, quantized")
ALGORITHMS.add("swarm", "relaxsgd.algorithms.swarm:SwarmSGD",
               "SwarmSGD: local steps, then averaging with one random neighbour; "
               "asynchronous, non-blocking, quantized")
ALGORITHMS.add("dpsgd", "relaxsgd.algorithms.dpsgd:DPSGD",
               "D-PSGD: synchronous gossip with the topology's mixing matrix every step")
ALGORITHMS.add("adpsgd", "relaxsgd.algorithms.adpsgd:ADPSGD",
               "AD-PSGD: asynchronous pairwise averaging with a random neighbour, stale "
               "gradients")
ALGORITHMS.add("sgp", "relaxsgd.algorithms.sgp:SGP",
               "Stochastic Gradient Push: push-sum over the one-peer exponential graph")
ALGORITHMS.add("choco", "relaxsgd.algorithms.choco:ChocoSGD",
               "Choco-SGD: compressed gossip of differences to public copies")
