"""A custom undirected graph read from an edge-list file."""

from __future__ import annotations

import os
from typing import ClassVar

from ..errors import ConfigError, shown
from .base import UndirectedGraph, require_int

MAX_BYTES = 16 << 20  # a ring of 100,000 nodes is ~1.2 MB


def read_edge_list(path: str | os.PathLike[str], n: int) -> list[tuple[int, int]]:
    """Edges ``(i, j)`` with ``i < j`` from a file of lines ``"i j"``.

    ``#`` starts a comment; blank lines are skipped; an edge listed twice (in either order)
    counts once. Node ids must be integers in ``0..n-1``; a self loop is an error. The
    file is read by :func:`relaxsgd.userfiles.read_text` (a regular UTF-8 file of at most
    :data:`MAX_BYTES`).
    """
    from ..userfiles import read_text

    lines = read_text(path, "edge list", MAX_BYTES, "give a text file of lines 'i j'"
                      ).splitlines()
    edges: set[tuple[int, int]] = set()
    for lineno, raw in enumerate(lines, 1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue
        where = f"line {lineno} of {path}"
        try:
            i, j = map(int, fields)  # ValueError for a non-integer or a wrong field count
        except ValueError:
            raise ConfigError(f"{where} is {shown(raw.strip())}; expected two node ids "
                              "'i j'") from None
        for v in (i, j):
            if not 0 <= v < n:
                raise ConfigError(f"node id {v} on {where} is out of range for n={n}; "
                                  f"ids must be 0..{n - 1}")
        if i == j:
            raise ConfigError(f"{where} is a self loop {i}-{j}; list edges between "
                              "distinct nodes")
        edges.add((min(i, j), max(i, j)))
    return sorted(edges)


class EdgeList(UndirectedGraph):
    """a custom undirected graph from a file of lines 'i j' (option path)

    The graph must be connected and use node ids ``0..n-1``. Degrees may differ, so the
    mixing weights are Metropolis-Hastings (see :class:`UndirectedGraph`). The seed is
    ignored.
    """

    name: ClassVar[str] = "edges"
    OPTIONS: ClassVar[dict[str, object]] = {"path": None}

    def __init__(self, n: int, seed: int = 0,
                 path: str | os.PathLike[str] | None = None) -> None:
        require_int(n, "the node count of an edge-list graph", 1)
        if path is None:
            raise ConfigError("topology 'edges' needs the option path=<file of lines 'i j'>")
        self.path = os.fspath(path)
        super().__init__(n, read_edge_list(path, n), f"the edge list {self.path}")
