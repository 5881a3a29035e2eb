"""The complete graph: every worker talks to every other."""

from __future__ import annotations

from typing import ClassVar

from .base import UndirectedGraph


class Complete(UndirectedGraph):
    """every node is a neighbour of every other (spectral gap 1)

    Uniform weights ``1/n``: one gossip step is an exact average. ``n = 1`` is a single node.
    The seed is ignored (deterministic graph).
    """

    name: ClassVar[str] = "complete"

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(n, [(i, j) for i in range(n) for j in range(i + 1, n)],
                         f"the complete graph on {n} nodes")
