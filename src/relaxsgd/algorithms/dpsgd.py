"""D-PSGD: synchronous decentralized parallel SGD with a mixing matrix (gossip every step).

X. Lian, C. Zhang, H. Zhang, C.-J. Hsieh, W. Zhang, J. Liu, "Can Decentralized Algorithms
Outperform Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic
Gradient Descent", NeurIPS 2017.

Math: W is the topology's doubly stochastic mixing matrix (``--topology``;
Metropolis-Hastings weights on irregular graphs, uniform ``1/(d+1)`` on regular ones; for a
directed time-varying graph such as ``exponential``, the matrix of the current step).
Every step, on every worker i:

- ``mix="cta"`` (combine-then-adapt, Lian et al.'s Algorithm 1, default):
  ``x_i <- sum_j W_ij x_j - eta g_i(x_i)``; the gradient is taken at the un-mixed model, so
  sending the model to the neighbours overlaps the gradient computation;
- ``mix="atc"`` (adapt-then-combine, the diffusion form):
  ``x_i <- sum_j W_ij (x_j - eta g_j(x_j))``: the local optimizer step first, then the
  exchange and mixing. On the complete graph (W = 11^T / n) this is exactly all-reduce
  SGD (the mean of the updated models = the model updated with the mean gradient, also
  with momentum, which is linear), a test.

The local optimizer (momentum, weight decay, schedule) is the worker's own, as everywhere.

Communication: every step each worker sends its model (4d bytes, float32) to each of its
(out-)neighbours and receives theirs (Send/Recv tagged with the step): deg(i) messages a
step, so the bytes per worker grow with the degree, not with n. Synchronous: a step ends
when all the neighbours' models have arrived.

Membership (issue 20, :mod:`relaxsgd.membership`): ``fixed``, because every step mixes with
ALL graph neighbours by a fixed doubly stochastic matrix and waits (Recv) for each: a
departed neighbour's message never comes, and re-weighting the matrix per membership is not
implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import (
    Algorithm,
    Checkpoint,
    Grad,
    Program,
    Recv,
    RunInfo,
    Send,
    Spawn,
    Wait,
    Worker,
    tensor_nbytes,
)

MIXES = ("cta", "atc")


@dataclass(frozen=True)
class DPSGDConfig:
    """mix: "cta" (x_i <- sum_j W_ij x_j - eta g_i(x_i), Lian et al. 2017; communication
    overlaps the gradient) or "atc" (local step first, then mix: x_i <- sum_j W_ij y_j)."""

    mix: str = "cta"

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ConfigError(f"dpsgd option mix={self.mix!r} is unknown; choose one of: "
                              f"{', '.join(MIXES)}")


class Mixer:
    """Who talks to whom at a step, and with which weights (row i of W at that step).

    ``peers(i, step) -> (out_peers, [(in_peer, weight)], self_weight)``. Static graphs are
    computed once; time-varying ones once per step of their period.
    """

    def __init__(self, topology: Any, n: int) -> None:
        self.topo, self.n = topology, n
        self.period = getattr(topology, "period", 1)
        self._cache: dict[tuple[int, int], tuple[list[int], list[tuple[int, float]], float]] = {}

    def peers(self, i: int, step: int) -> tuple[list[int], list[tuple[int, float]], float]:
        key = (i, step % self.period)
        if key not in self._cache:
            w = self.topo.mixing_matrix(key[1])
            outs = list(self.topo.neighbors(i, key[1]))
            ins = [(j, float(w[i, j])) for j in range(self.n) if j != i and w[i, j] > 0]
            self._cache[key] = (outs, ins, float(w[i, i]))
        return self._cache[key]


def gossip(w: Worker, x: Any, outs: list[int], ins: list[int], tag: Any,
           nbytes: int | None = None) -> Program:
    """Send ``x`` (never modified afterwards) to every out-peer and return the in-peers'
    payloads, by peer; ``nbytes``: the size of ``x`` on the wire (default: a tensor's)."""
    nb = tensor_nbytes(x) if nbytes is None else nbytes
    for j in outs:
        yield Send(j, x, nb, tag=tag)
    got = {}
    for j in ins:
        got[j] = yield Recv(j, tag=tag)
    return got


def mix(x: Tensor, self_weight: float, ins: list[tuple[int, float]],
        got: dict[int, Tensor]) -> Tensor:
    """``W_ii x + sum_j W_ij x_j`` (accumulated in float64 for exact weights)."""
    acc = x.to(torch.float64) * self_weight
    for j, wij in ins:
        acc += got[j].to(torch.float64) * wij
    return acc.to(x.dtype)


class DPSGD(Algorithm):
    name = "dpsgd"
    Config = DPSGDConfig
    needs_topology = True
    metric_keys = ("interactions_per_worker",)
    resumable = True
    membership = "fixed"
    fixed_reason = ("every step mixes with all graph neighbours by a fixed doubly "
                    "stochastic matrix and waits for each one's message")

    def __init__(self, cfg: DPSGDConfig, info: RunInfo) -> None:
        super().__init__(cfg, info)
        self.mixer: Mixer | None = None

    def program(self, w: Worker) -> Program:
        if self.mixer is None:
            self.mixer = Mixer(self.info.topology, self.info.n)
        # Loop state: w.step, the round k (one local step a round); every message of a
        # round is received in that round, so nothing waits in an inbox at the loop's top.
        while w.step < w.total_steps:
            yield Checkpoint()
            k = w.step
            outs, ins, self_w = self.mixer.peers(w.rank, k)
            if self.cfg.mix == "cta":
                x = w.params.clone()
                h = yield Spawn(gossip(w, x, outs, [j for j, _ in ins], k))
                g = yield Grad()
                got = yield Wait(h)
                w.params.copy_(mix(x, self_w, ins, got))
                w.apply_grad(g)
            else:
                g = yield Grad()
                w.apply_grad(g)
                x = w.params.clone()
                got = yield from gossip(w, x, outs, [j for j, _ in ins], k)
                w.params.copy_(mix(x, self_w, ins, got))
            w.count("interactions_per_worker", len(ins) / self.info.n)
