"""Random d-regular graphs, seeded."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..errors import ConfigError
from .base import UndirectedGraph, components, require_int

MAX_TRIES = 200


def _pairing(n: int, d: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    """One attempt at a simple d-regular graph (Steger & Wormald 1999, as in networkx).

    Repeatedly pairs the remaining half-edges ("stubs") at random, keeping the pairs that
    are neither loops nor repeats; returns None when the stubs left cannot be paired.
    """
    edges: set[tuple[int, int]] = set()
    stubs = [v for v in range(n) for _ in range(d)]
    while stubs:
        leftover: dict[int, int] = {}
        order = rng.permutation(len(stubs))
        for a, b in zip(order[0::2], order[1::2], strict=True):
            u, v = sorted((stubs[a], stubs[b]))
            if u != v and (u, v) not in edges:
                edges.add((u, v))
            else:
                leftover[u] = leftover.get(u, 0) + 1
                leftover[v] = leftover.get(v, 0) + 1
        nodes = list(leftover)
        # Suitable = some pair of left-over nodes can still be joined by a new edge.
        if nodes and not any((min(u, v), max(u, v)) not in edges
                             for k, u in enumerate(nodes) for v in nodes[k + 1:]):
            return None
        stubs = [v for v, c in leftover.items() for _ in range(c)]
    return edges


def _draw(n: int, d: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    if d == 2:
        # A connected 2-regular graph is one cycle: draw a uniformly random cycle directly
        # (a random 2-regular graph is connected with probability O(1/sqrt(n)) only).
        p = rng.permutation(n).tolist()
        return {(min(p[k], p[(k + 1) % n]), max(p[k], p[(k + 1) % n])) for k in range(n)}
    if d > (n - 1) // 2:
        # Dense: the pairing gets stuck; draw the sparse complement instead.
        sparse = _pairing(n, n - 1 - d, rng)
        if sparse is None:
            return None
        return {(i, j) for i in range(n) for j in range(i + 1, n)} - sparse
    return _pairing(n, d, rng)


class RandomRegular(UndirectedGraph):
    """a random connected d-regular graph (option degree, seeded)

    Every node has exactly ``degree`` neighbours (default 4); uniform weights ``1/(d+1)``.
    Needs ``n * degree`` even and ``degree < n``. Drawn with the Steger-Wormald pairing
    (the complement is drawn when ``degree > (n-1)/2``; degree 2 draws a random Hamiltonian
    cycle); a disconnected or stuck draw is redrawn, up to 200 tries, from a numpy
    generator seeded with ``seed``: the same (n, degree, seed) always gives the same graph.
    """

    name: ClassVar[str] = "random-regular"
    OPTIONS: ClassVar[dict[str, object]] = {"degree": 4}

    def __init__(self, n: int, seed: int = 0, degree: int = 4) -> None:
        require_int(n, "the node count of a random-regular graph", 1)
        d = require_int(degree, "random-regular option degree", 0)
        if d >= n:
            raise ConfigError(f"random-regular degree={d} needs degree < n={n}; "
                              f"use degree <= {n - 1} ({n - 1} = complete graph)")
        if (n * d) % 2:
            raise ConfigError(f"random-regular needs n*degree even, got n={n}, degree={d}; "
                              f"use degree={d - 1 if d > 1 else d + 1} or an even n")
        if n > 2 and d < 2:
            raise ConfigError(f"random-regular degree={d} is always disconnected for n={n}; "
                              "use degree >= 2")
        self.degree = d
        rng = np.random.default_rng(seed)
        for _ in range(MAX_TRIES):
            edges = _draw(n, d, rng)
            if edges is not None:
                adj: list[list[int]] = [[] for _ in range(n)]
                for i, j in edges:
                    adj[i].append(j)
                    adj[j].append(i)
                if len(components(n, adj)) == 1:
                    super().__init__(n, sorted(edges), f"the random {d}-regular graph")
                    return
        raise ConfigError(f"no connected random {d}-regular graph on n={n} nodes in "
                          f"{MAX_TRIES} draws (seed {seed}); use a larger degree")
