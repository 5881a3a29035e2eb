"""Algorithms: one file each (see algorithms/base.py), one registry line each."""

from ..registry import Registry

ALGORITHMS = Registry("algorithm")
ALGORITHMS.add("allreduce", "relaxsgd.algorithms.allreduce:AllReduceSGD",
               "synchronous all-reduce SGD: gradient mean every step (large-batch SGD)")
ALGORITHMS.add("localsgd", "relaxsgd.algorithms.localsgd:LocalSGD",
               "Local SGD: p local steps, then a blocking model average")
