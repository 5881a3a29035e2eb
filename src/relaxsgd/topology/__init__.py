"""Topologies: one file per graph family, one registry line each (see topology/base.py).

:func:`make_topology` builds one by name with validated options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..registry import Registry

if TYPE_CHECKING:
    from .base import Topology

TOPOLOGIES = Registry("topology")
TOPOLOGIES.add("complete", "relaxsgd.topology.complete:Complete",
               "every node is a neighbour of every other (spectral gap 1)")
TOPOLOGIES.add("ring", "relaxsgd.topology.ring:Ring",
               "node i talks to i-1 and i+1 (mod n); degree 2, spectral gap O(1/n^2)")
TOPOLOGIES.add("torus", "relaxsgd.topology.torus:Torus",
               "2-D wrap-around grid of rows x cols >= 3 x 3 nodes, degree 4")
TOPOLOGIES.add("hypercube", "relaxsgd.topology.hypercube:Hypercube",
               "n = 2^k nodes, i talks to the k nodes differing in one bit")
TOPOLOGIES.add("random-regular", "relaxsgd.topology.random_regular:RandomRegular",
               "a random connected d-regular graph (option degree, seeded)")
TOPOLOGIES.add("exponential", "relaxsgd.topology.exponential:Exponential",
               "directed one-peer graph, at step k node i sends to "
               "i + 2^(k mod log2 n)")
TOPOLOGIES.add("edges", "relaxsgd.topology.edges:EdgeList",
               "a custom undirected graph from a file of lines 'i j' (option path)")


def make_topology(name: str, n: int, seed: int = 0, **opts: Any) -> Topology:
    """The topology ``name`` on ``n`` nodes; ``opts`` are checked against its ``OPTIONS``.

    Unknown names and options raise ConfigError listing the valid ones; the class's
    constructor validates the values (node count, degree, file, connectivity).
    """
    return check_topology(name, opts)(n, seed=seed, **opts)


def check_topology(name: str, opts: dict[str, Any]) -> type[Topology]:
    """The class of topology ``name``; ConfigError for an unknown name or option (checked
    for every run, also of an algorithm that builds no graph: a typo is never ignored)."""
    cls = TOPOLOGIES.get(name)
    unknown = sorted(set(opts) - set(cls.OPTIONS))
    if unknown:
        valid = ", ".join(cls.OPTIONS) or "none"
        raise ConfigError(f"unknown option {', '.join(unknown)} for topology {name!r}; "
                          f"valid options: {valid}")
    return cls  # type: ignore[no-any-return]
