"""The topology contract: pure data about who talks to whom.

A topology of ``n`` nodes gives ``neighbors(i, step=0)`` (sorted list of ints; time-varying
graphs depend on ``step``), ``mixing_matrix(step=0)`` (a symmetric doubly stochastic
``n x n`` float64 tensor for undirected graphs: uniform ``1/(d+1)`` weights on regular
graphs, Metropolis-Hastings weights otherwise; column-stochastic push weights for directed
time-varying ones), ``spectral_gap(step=0)`` (1 - |second largest eigenvalue| of the mixing
matrix), ``edges()`` (undirected edge list, i < j), ``period`` (1 for static graphs).
Construction validates: a disconnected graph, an unrealisable degree or a node count the
topology cannot take raise ConfigError with one clear line.

Every registered class also has ``OPTIONS`` (option name -> default; ``None`` = required or
derived) and a constructor ``Cls(n, seed=0, **options)``; deterministic graphs ignore the
seed. :func:`relaxsgd.topology.make_topology` is the validated way to build one by name.
The first line of each class's docstring is its one-line description (``relaxsgd list``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import checks
from ..errors import ConfigError


class Topology:
    name: ClassVar[str] = ""
    directed: ClassVar[bool] = False
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, n: int) -> None:
        self.n = n
        self.period = 1

    def neighbors(self, i: int, step: int = 0) -> list[int]:
        raise NotImplementedError

    def edges(self, step: int = 0) -> list[tuple[int, int]]:
        return sorted({(min(i, j), max(i, j)) for i in range(self.n)
                       for j in self.neighbors(i, step) if i != j})

    def mixing_matrix(self, step: int = 0) -> Tensor:
        raise NotImplementedError

    def spectral_gap(self, step: int = 0) -> float:
        w = self.mixing_matrix(step)
        ev = torch.linalg.eigvals(w).abs().sort(descending=True).values
        return float(1.0 - ev[1]) if self.n > 1 else 1.0

    def _check_node(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise ConfigError(f"node {i} is out of range for the {self.n}-node {self.name} "
                              f"topology; nodes are 0..{self.n - 1}")


def require_int(value: Any, what: str, at_least: int) -> int:
    """``value`` as an int >= ``at_least``, else a one-line ConfigError naming ``what``."""
    return checks.require_int(value, what, at_least=at_least)


def components(n: int, adjacency: list[list[int]]) -> list[list[int]]:
    """Connected components (each a sorted node list), by breadth-first search."""
    seen = [False] * n
    comps: list[list[int]] = []
    for start in range(n):
        if seen[start]:
            continue
        seen[start] = True
        comp, frontier = [start], [start]
        while frontier:
            nxt = []
            for u in frontier:
                for v in adjacency[u]:
                    if not seen[v]:
                        seen[v] = True
                        nxt.append(v)
            comp.extend(nxt)
            frontier = nxt
        comps.append(sorted(comp))
    return comps


class UndirectedGraph(Topology):
    """A static undirected graph given by its edges; validates connectivity.

    Mixing weights are Metropolis-Hastings, ``W_ij = 1 / (1 + max(d_i, d_j))`` on an edge,
    ``W_ii = 1 - sum_j W_ij`` (Xiao & Boyd 2004): symmetric and doubly stochastic for any
    degrees, and on a d-regular graph exactly the uniform ``1/(d+1)`` weights (self weight
    included), so one formula serves both cases. The matrix and its eigenvalues are
    computed on first use, not in the constructor.
    """

    def __init__(self, n: int, edge_list: Iterable[tuple[int, int]], source: str) -> None:
        super().__init__(require_int(n, f"the node count of {source}", 1))
        adj: list[set[int]] = [set() for _ in range(n)]
        for i, j in edge_list:
            adj[i].add(j)
            adj[j].add(i)
        self._adj = [sorted(a) for a in adj]
        comps = components(n, self._adj)
        if len(comps) > 1:
            unreachable = comps[1][0]
            raise ConfigError(
                f"{source} is disconnected: {len(comps)} components on {n} nodes (node "
                f"{unreachable} is unreachable from node 0); it must be connected")
        self._w: Tensor | None = None

    def neighbors(self, i: int, step: int = 0) -> list[int]:
        self._check_node(i)
        return list(self._adj[i])

    def degrees(self) -> list[int]:
        return [len(a) for a in self._adj]

    def mixing_matrix(self, step: int = 0) -> Tensor:
        if self._w is None:
            deg = self.degrees()
            w = torch.zeros(self.n, self.n, dtype=torch.float64, device="cpu")  # pure data
            for i, nbrs in enumerate(self._adj):
                for j in nbrs:
                    w[i, j] = 1.0 / (1.0 + max(deg[i], deg[j]))
            # The diagonal takes what the edges leave, so every row (and column) sums to 1.
            w += torch.diag(1.0 - w.sum(1))
            self._w = w
        return self._w.clone()

    def spectral_gap(self, step: int = 0) -> float:
        if self.n == 1:
            return 1.0
        # Symmetric: eigvalsh is exact-real and faster than the general eigvals.
        ev = torch.linalg.eigvalsh(self.mixing_matrix()).abs().sort(descending=True).values
        return float(1.0 - ev[1])
