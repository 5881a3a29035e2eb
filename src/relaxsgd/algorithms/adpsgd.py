"""AD-PSGD: asynchronous decentralized SGD with pairwise averaging and stale gradients.

X. Lian, W. Zhang, C. Zhang, J. Liu, "Asynchronous Decentralized Parallel Stochastic
Gradient Descent", ICML 2018.

Math: each worker loops, with no global clock: (1) read its model ``xhat = x_i``;
(2) compute a stochastic gradient ``g = g_i(xhat)``; meanwhile (3) average its model
with one neighbour j drawn uniformly at random, ``x_i, x_j <- (x_i + x_j) / 2`` (an atomic
pairwise average); (4) apply the now stale gradient with the local optimizer,
``x_i <- x_i - eta g``. The averaging of step (3) is done as two additive halves, the
partner ``x_j += (x_i^sent - x_j) / 2`` computed when the request arrives (and added at its
next step boundary: a handler must not write the model of a worker that is computing) and
the initiator
``x_i += (x_j^answered - x_i^sent) / 2`` when the answer arrives: that is the atomic
average when nothing else touched the two models in between, and it always keeps
``x_i + x_j`` exactly (the sum of all models changes only by gradient steps).

Active/passive split (``split``): Lian et al. split the workers of a bipartite graph into
active ones, which initiate averaging with passive neighbours, and passive ones, which only
compute and answer, to avoid deadlocks between two workers that lock each other.
``bipartite`` requires a bipartite graph (ring with even n, torus with even sides,
hypercube) and makes colour 0 of its 2-colouring active; ``none`` lets every worker
initiate (no deadlock arises in either runtime: the partner answers from a handler);
``auto`` (default) is ``bipartite`` when the graph is bipartite, else ``none``.

Communication: an active worker sends its model (4d bytes) to one neighbour per step, and
the neighbour answers with its own (4d bytes); the exchange is non-blocking and overlaps
the gradient computation. Metrics: ``interactions_per_worker`` (each side of an averaging
counts 1/n); ``staleness_mean``: averagings applied to a worker's model between the read
of step (1) and the application of its gradient, its own one included (the partner's model
is always read live, at the request's arrival).

Membership (issue 20, :mod:`relaxsgd.membership`): ``gossip``: each averaging partner is
drawn among the LIVE targets (``Members()``); an exchange with a partner that left raises
``PeerUnavailable`` and the step goes on without the average. A (re)joiner takes its lowest-
id live neighbour's model and state at that neighbour's safe point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..devices import draw
from ..errors import ConfigError
from .base import (
    Algorithm,
    Checkpoint,
    Exchange,
    Grad,
    Members,
    PeerUnavailable,
    Program,
    Reply,
    RunInfo,
    Wait,
    Worker,
    tensor_nbytes,
)
from .swarm import absorb, add_later, finish, undirected_neighbors

SPLITS = ("auto", "bipartite", "none")


@dataclass(frozen=True)
class ADPSGDConfig:
    """split: "auto" (bipartite split when the graph is bipartite, else none),
    "bipartite" (active colour 0 initiates with passive colour 1; needs a bipartite
    graph) or "none" (every worker initiates)."""

    split: str = "auto"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ConfigError(f"adpsgd option split={self.split!r} is unknown; choose one "
                              f"of: {', '.join(SPLITS)}")


def two_colouring(nbrs: list[list[int]]) -> list[int] | None:
    """Colours 0/1 with every edge bichromatic (breadth-first), or None if not bipartite."""
    colour = [-1] * len(nbrs)
    for start in range(len(nbrs)):
        if colour[start] >= 0:
            continue
        colour[start], frontier = 0, [start]
        while frontier:
            nxt = []
            for u in frontier:
                for v in nbrs[u]:
                    if colour[v] < 0:
                        colour[v] = 1 - colour[u]
                        nxt.append(v)
                    elif colour[v] == colour[u]:
                        return None
            frontier = nxt
    return colour


class ADPSGD(Algorithm):
    name = "adpsgd"
    Config = ADPSGDConfig
    needs_topology = True
    metric_keys = ("interactions_per_worker", "staleness_mean")
    resumable = True
    asynchronous = True  # the dist runtime saves each worker on its own
    membership = "gossip"

    def __init__(self, cfg: ADPSGDConfig, info: RunInfo) -> None:
        super().__init__(cfg, info)
        self._targets: list[list[int]] | None = None

    def targets(self, i: int) -> list[int]:
        """The neighbours worker ``i`` initiates averaging with (empty: passive)."""
        if self._targets is None:
            nbrs = undirected_neighbors(self.info.topology,
                                        self.info.extra.get("max_workers", self.info.n))
            colour = two_colouring(nbrs)
            if self.cfg.split == "bipartite" and colour is None:
                raise ConfigError(f"adpsgd split=bipartite needs a bipartite graph; the "
                                  f"{self.info.topology.name} topology on n={self.info.n} is "
                                  "not (use split=none, or a ring with even n, a torus with "
                                  "even sides, a hypercube)")
            if self.cfg.split == "none" or colour is None:
                self._targets = nbrs
            else:
                self._targets = [nb if colour[i] == 0 else [] for i, nb in enumerate(nbrs)]
        return self._targets[i]

    def init_worker(self, w: Worker) -> None:
        w.state["averagings"] = 0

    def program(self, w: Worker) -> Program:
        # Loop state: w.step and w.rng; the handler's pending averages wait in
        # w.state["acc"] (add_later), and nothing is in flight at the loop's top.
        targets = self.targets(w.rank)
        while w.step < w.total_steps:
            yield Checkpoint()
            absorb(w)
            read = w.state["averagings"]
            live = set((yield Members()))  # partners among the live targets (issue 20)
            near = [j for j in targets if j in live]
            if near:
                peer = near[int(draw(torch.randint, len(near), (), generator=w.rng,
                                             device=w.rng.device))]
                sent = w.params.clone()
                h = yield Exchange(peer, sent, tensor_nbytes(sent), blocking=False)
                g = yield Grad()
                try:
                    theirs = yield Wait(h)
                except PeerUnavailable:  # lost partner (dist runtime only): skip the average
                    theirs = None
                absorb(w)
                if theirs is not None:
                    w.params.add_((theirs - sent) / 2)
                    self._averaged(w)
            else:
                g = yield Grad()
                absorb(w)
            w.observe("staleness", w.state["averagings"] - read)
            w.apply_grad(g)
        finish(w)

    def _averaged(self, w: Worker) -> None:
        w.state["averagings"] += 1
        w.count("interactions_per_worker", 1.0 / self.info.n)

    def on_exchange(self, w: Worker, src: int, payload: Any) -> Reply:
        """The partner's half of the atomic average: read its model (with the averages
        not yet absorbed), answer with it, and add ``(x_src - mine) / 2`` at its next step
        boundary (it is computing a gradient; the model is not written meanwhile)."""
        mine = w.params.clone()
        if w.state.get("acc") is not None:
            mine += w.state["acc"]
        add_later(w, (payload - mine) / 2)
        self._averaged(w)
        return Reply(mine, tensor_nbytes(mine))
