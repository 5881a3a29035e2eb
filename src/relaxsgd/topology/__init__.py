"""Topologies: one file per graph family, one registry line each (see topology/base.py)."""

from ..registry import Registry

TOPOLOGIES = Registry("topology")
