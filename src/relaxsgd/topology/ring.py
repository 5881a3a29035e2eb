"""The ring (cycle) graph."""

from __future__ import annotations

from typing import ClassVar

from .base import UndirectedGraph, require_int


class Ring(UndirectedGraph):
    """node i talks to i-1 and i+1 (mod n); degree 2, spectral gap O(1/n^2)

    Weights 1/3 (self included) for ``n >= 3``: eigenvalues ``1/3 + 2/3 cos(2 pi k / n)``.
    ``n = 2`` is one edge (weights 1/2), ``n = 1`` a single node. The seed is ignored.
    """

    name: ClassVar[str] = "ring"

    def __init__(self, n: int, seed: int = 0) -> None:
        require_int(n, "the node count of a ring", 1)
        # A set, because for n = 2 the edges (0, 1) and (1, 0) are one and the same.
        edges = {(min(i, (i + 1) % n), max(i, (i + 1) % n)) for i in range(n) if n > 1}
        super().__init__(n, sorted(edges), f"the ring on {n} nodes")
