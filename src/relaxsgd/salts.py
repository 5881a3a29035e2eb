"""Every random stream of a run, and its salt: the one place where they are chosen.

A stream is seeded from (run seed, worker rank, salt) by
:func:`relaxsgd.training.seeded_generator` (or, where noted, a formula of its own). Two
streams with the same salt would draw the same numbers for the same seed and rank (issue 9
found SwarmSGD's handler stream equal to CIFAR-10's augmentation stream), so every salt
here is distinct, and a test checks it and that the streams' first draws differ.
"""

from __future__ import annotations

DATA = 1  # a worker's data sampler (bank.Bank)
ALGO = 2  # worker.rng: the algorithm's per-worker stream (worker.LocalWorker, dist wrapper)
AUGMENT = 11  # data augmentation, e.g. CIFAR-10 crops and flips (bank.Bank)
SWARM_HANDLER = 12  # SwarmSGD: the stochastic rounding of replies made in a handler
SERVER = 7_777  # the parameter server's stream (algorithms.server.ParameterServer)
SWARM_PLAN = 0x5A4A  # SwarmSGD's sequential edge stream (numpy, [seed, salt], not per rank)
CHURN = 0xC4A2  # the simulator's failure times (membership.ChurnDraws: random.Random, per id)

ALL = {"DATA": DATA, "ALGO": ALGO, "AUGMENT": AUGMENT, "SWARM_HANDLER": SWARM_HANDLER,
       "SERVER": SERVER, "SWARM_PLAN": SWARM_PLAN, "CHURN": CHURN}
# Streams with formulas of their own, not salted here: sim.compute (random.Random(seed *
# 1_000_033 + rank)), sim.network (random.Random(seed * 31 + 17)), compress.randk's
# shared index stream and compress.powersgd's start matrix (seeds given by their options).
