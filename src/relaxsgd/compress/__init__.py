"""Compressors: one file per family, one registry line each (see compress/base.py)."""

from ..registry import Registry

COMPRESSORS = Registry("compressor")
