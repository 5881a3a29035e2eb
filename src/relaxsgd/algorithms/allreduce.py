"""Synchronous all-reduce SGD ("large-batch SGD"), the baseline every method is measured by.

Every step each worker computes a stochastic gradient on its own batch, the gradients are
averaged with a blocking ring all-reduce, and every worker applies the mean with its local
optimizer. With identical initial models (and momentum applied to identical averaged
gradients) the workers stay identical: this is mini-batch SGD with batch n*b (Goyal et al.
2017). Communication per step: one all-reduce of d floats.

Membership (issue 20, :mod:`relaxsgd.membership`): ``quorum``: each step's gradient mean is
taken among the workers present (a quorum; weights 1/participants). A departed worker's
gradient is simply absent; a (re)joiner takes its donor's model, momentum and step count at
the donor's safe point and contributes from its next step (nothing of its own to fix in
``adopt``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Algorithm, AllReduce, Checkpoint, Grad, Program, Worker


@dataclass(frozen=True)
class AllReduceConfig:
    """All-reduce SGD has no options of its own (compressed variants: ``efsgd``)."""


class AllReduceSGD(Algorithm):
    name = "allreduce"
    Config = AllReduceConfig
    resumable = True
    membership = "quorum"

    def program(self, w: Worker) -> Program:
        while w.step < w.total_steps:
            yield Checkpoint()
            g = yield Grad()
            mean = yield AllReduce(g)
            w.apply_grad(mean)
