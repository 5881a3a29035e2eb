"""Local SGD (Stich 2019; Lin et al. 2018): ``p`` local steps, then a blocking model average.

Each round, every worker runs ``p`` local optimizer steps on its own data, then the models
are averaged with a blocking all-reduce of d floats. With ``p = 1`` and plain SGD (no
momentum) this is exactly all-reduce SGD. Momentum buffers stay local (option
``average_momentum`` averages them too, as some implementations do).

Membership (issue 20, :mod:`relaxsgd.membership`): ``quorum``: each round's model average is
taken among the workers present (weights 1/participants). A departed worker's local steps
since the last average are lost with it; a (re)joiner takes its donor's model and optimizer
state and averages from its next round.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import require_int
from ..tune.params import Int
from .base import Algorithm, AllReduce, Checkpoint, Compute, Program, Worker


@dataclass(frozen=True)
class LocalSGDConfig:
    """p: local steps between averages; average_momentum: also average momentum buffers."""

    p: int = 4
    average_momentum: bool = False

    def __post_init__(self) -> None:
        require_int(self.p, "localsgd option p (local steps per round)", at_least=1)


class LocalSGD(Algorithm):
    name = "localsgd"
    membership = "quorum"
    Config = LocalSGDConfig
    resumable = True
    search_space = {"p": Int(1, 256, log=True)}

    def program(self, w: Worker) -> Program:
        cfg: LocalSGDConfig = self.cfg
        while w.step < w.total_steps:
            yield Checkpoint()
            yield Compute(min(cfg.p, w.total_steps - w.step))
            if cfg.average_momentum:
                mom = w.momentum
                avg = yield AllReduce([w.params, mom])
                w.params.copy_(avg[0])
                mom.copy_(avg[1])
            else:
                avg = yield AllReduce(w.params)
                w.params.copy_(avg)
