"""The 2-D torus (wrap-around grid) graph."""

from __future__ import annotations

import math
from typing import ClassVar

from ..errors import ConfigError
from .base import UndirectedGraph, require_int


def _splits(n: int) -> list[int]:
    """Row counts r with r * c = n and r, c >= 3 (both sides wrap without repeated edges)."""
    return [r for r in range(3, n // 3 + 1) if n % r == 0 and n // r >= 3]


def _nearest_valid(n: int) -> str:
    below = next((m for m in range(n - 1, 8, -1) if _splits(m)), None)
    above = next(m for m in range(max(n + 1, 9), 2 * n + 10) if _splits(m))
    return f"n={below} or n={above}" if below else f"n={above}"


class Torus(UndirectedGraph):
    """2-D wrap-around grid of rows x cols >= 3 x 3 nodes, degree 4

    Node ``i`` sits at ``(i // cols, i % cols)`` and talks to its 4 grid neighbours (mod the
    sides). Option ``rows``: the number of rows (must divide n, with rows, n/rows >= 3); by
    default the split closest to square. Sides of 3 or more keep the 4 neighbours distinct,
    so the graph is 4-regular with uniform weights 1/5. The seed is ignored.
    """

    name: ClassVar[str] = "torus"
    OPTIONS: ClassVar[dict[str, object]] = {"rows": None}

    def __init__(self, n: int, seed: int = 0, rows: int | None = None) -> None:
        require_int(n, "the node count of a torus", 1)
        splits = _splits(n)
        if not splits:
            raise ConfigError(f"torus needs n = rows*cols with rows, cols >= 3; n={n} has no "
                              f"such split; use e.g. {_nearest_valid(n)}")
        if rows is None:
            rows = max(r for r in splits if r <= math.isqrt(n))
        elif require_int(rows, "torus option rows", 3) not in splits:
            raise ConfigError(f"torus rows={rows} does not split n={n} into rows, cols >= 3; "
                              f"valid rows: {', '.join(map(str, splits))}")
        cols = n // rows
        self.rows, self.cols = rows, cols
        edges = []
        for i in range(n):
            r, c = divmod(i, cols)
            edges.append((i, r * cols + (c + 1) % cols))
            edges.append((i, ((r + 1) % rows) * cols + c))
        super().__init__(n, edges, f"the {rows}x{cols} torus")
