"""The hypercube graph."""

from __future__ import annotations

from typing import ClassVar

from ..errors import ConfigError
from .base import UndirectedGraph, require_int


class Hypercube(UndirectedGraph):
    """n = 2^k nodes, i talks to the k nodes differing in one bit

    Degree ``k = log2 n``, uniform weights ``1/(k+1)``. The seed is ignored.
    """

    name: ClassVar[str] = "hypercube"

    def __init__(self, n: int, seed: int = 0) -> None:
        require_int(n, "the node count of a hypercube", 1)
        if n & (n - 1):
            lower = 1 << (n.bit_length() - 1)
            raise ConfigError(f"hypercube needs n a power of 2, got n={n}; "
                              f"use n={lower} or n={2 * lower}")
        k = n.bit_length() - 1
        edges = [(i, i ^ (1 << b)) for i in range(n) for b in range(k) if i < i ^ (1 << b)]
        super().__init__(n, edges, f"the hypercube on {n} nodes")
