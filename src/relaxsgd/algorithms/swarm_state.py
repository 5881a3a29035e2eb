"""SwarmSGD's graph, sequential schedule and handler-to-program state (see :mod:`.swarm`).

Contract. :func:`undirected_neighbors`: neighbour lists of the union of a topology's edges.
:func:`sequential_plans`: the analysed model's shared stream of random edges, cut into each
worker's plan ``(t, partner, local steps, initiator)``, the same on every worker for a
seed; :func:`stream_positions`: where its checkpoints sit (a consistent cut).
:func:`add_later` / :func:`absorb` / :func:`finish`: how a handler that answers at once
defers its write of the model to the program's next step boundary (the distributed runtime
runs handlers on its communication thread); the deferred sum waits in ``w.state["acc"]``,
so a checkpoint saves it. Also used by AD-PSGD and SGP.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from .. import salts
from ..topology.base import UndirectedGraph
from .base import Worker

Plan = list[tuple[int, int, int, bool]]


def undirected_neighbors(topology: Any, n: int) -> list[list[int]]:
    """Neighbour lists of the union of the topology's edges over one period (a
    time-varying or directed graph becomes the undirected graph of all its links)."""
    if (isinstance(topology, UndirectedGraph) and getattr(topology, "period", 1) == 1
            and topology.n == n):
        # a static undirected graph's adjacency is that union already; rebuilding it from
        # n^2/2 edge tuples took 15 s of a 35 s run at 1,024 workers on the complete graph
        return [[j for j in topology.neighbors(i) if j != i] for i in range(n)]
    adj: list[set[int]] = [set() for _ in range(n)]
    for s in range(getattr(topology, "period", 1)):
        for a, b in topology.edges(s):
            adj[a].add(b)
            adj[b].add(a)
    return [sorted(a) for a in adj]


def sequential_plans(edges: list[tuple[int, int]], n: int, total: int, seed: int, H: int,
                     geometric: bool) -> list[Plan]:
    """Each worker's part of the shared edge stream: interaction t on a uniformly drawn
    edge, in a random direction, with H (or Geometric(1/H)) local steps per side, capped
    by what is left of the worker's ``total``; the stream stops at the first t where every
    worker has done its ``total`` (later interactions of a spent worker have 0 steps)."""
    plans: list[Plan] = [[] for _ in range(n)]
    if not edges:
        return plans
    rng = np.random.default_rng([seed, salts.SWARM_PLAN])
    done, left, t = [0] * n, n, 0
    while left:
        e = rng.integers(len(edges), size=4096)
        flip = rng.random(4096) < 0.5
        hs = rng.geometric(1.0 / H, size=(4096, 2)) if geometric else np.full((4096, 2), H)
        for k in range(4096):
            i, j = edges[int(e[k])]
            if flip[k]:
                i, j = j, i
            for a, b, h, init in ((i, j, int(hs[k, 0]), True), (j, i, int(hs[k, 1]), False)):
                h = min(h, total - done[a])
                if done[a] < total and done[a] + h >= total:
                    left -= 1
                done[a] += h
                plans[a].append((t, b, h, init))
            t += 1
            if not left:
                break
    return plans


def stream_positions(plans: list[Plan]) -> list[float]:
    """Checkpoint positions of the sequential stream: entry t is the mean, over the n
    workers, of the local steps the stream's interactions before t give them (so, like
    the position of every other algorithm, about the local steps per worker done by then,
    and ``checkpoint_every`` keeps its meaning). It depends on t alone and never decreases
    with t: when every worker stops at its first interaction whose position is at or past
    P, an interaction is either before the cut on both its sides (both do it) or after it
    on both (neither starts it), so the cut is consistent and nobody waits for a message
    of a worker that stopped (the rule in :mod:`relaxsgd.algorithms.base`)."""
    count = 1 + max((e[0] for plan in plans for e in plan), default=-1)
    steps = np.zeros(count + 1, dtype=np.int64)
    for plan in plans:
        for t, _, h, _ in plan:
            steps[t + 1] += h
    n = max(len(plans), 1)
    return [float(c) / n for c in np.cumsum(steps)[:count]]


def add_later(w: Worker, delta: Tensor) -> None:
    """Handler side: add ``delta`` to the worker's model at its next step boundary.

    A handler that answers at once must not write ``w.params`` (the distributed runtime
    runs it on its communication thread while the main thread may be taking local steps),
    so the delta waits in ``w.state["acc"]`` until the program calls :func:`absorb`; after
    the program has finished (:func:`finish`) it is applied at once. Additive updates
    commute, so the result is the same as applying it at arrival.
    """
    if w.state.get("finished"):
        w.params.add_(delta)
    elif w.state.get("acc") is None:
        w.state["acc"] = delta.clone()
    else:
        w.state["acc"].add_(delta)


def absorb(w: Worker) -> None:
    """Program side: apply the deltas handlers left since the last boundary."""
    acc = w.state.pop("acc", None)
    if acc is not None:
        w.params.add_(acc)


def finish(w: Worker) -> None:
    """Program side, at its end: absorb, and let handlers write the model from now on."""
    absorb(w)
    w.state["finished"] = True
