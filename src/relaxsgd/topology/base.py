"""The topology contract: pure data about who talks to whom.

A topology of ``n`` nodes gives ``neighbors(i, step=0)`` (sorted list of ints; time-varying
graphs depend on ``step``), ``mixing_matrix(step=0)`` (a symmetric doubly stochastic
``n x n`` float64 tensor for undirected graphs: uniform ``1/(d+1)`` weights on regular
graphs, Metropolis-Hastings weights otherwise; column-stochastic push weights for directed
time-varying ones), ``spectral_gap(step=0)`` (1 - |second largest eigenvalue| of the mixing
matrix), ``edges()`` (undirected edge list, i < j), ``period`` (1 for static graphs).
Construction validates: a disconnected graph, an unrealisable degree or a node count the
topology cannot take raise ConfigError with one clear line.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor


class Topology:
    name: ClassVar[str] = ""
    directed: ClassVar[bool] = False

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
