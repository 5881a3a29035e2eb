"""Calibrated profile files: what ``relaxsgd calibrate`` writes and the simulator loads.

One YAML (or JSON, a subset) mapping with up to two sections, ``compute`` and
``network``; ``--compute FILE`` reads the first, ``--network FILE`` the second::

    compute: {flops_per_s: 3.1e10, overhead_s: 2.4e-4, step_time_s: 5.6e-4,
              flops_per_step: 1.4e7, source: "calibrate on 2 lab workers ..."}
    network: {latency_s: 0.025, bandwidth_Bps: 1.0e7, backend: gloo,
              collectives: {allreduce: {"2": [0.101, 1.05e-7]}, ...}}

Untrusted input: read by :mod:`relaxsgd.userfiles` (a regular file of at most
:data:`MAX_BYTES`) and :mod:`relaxsgd.yamlio` (no alias bombs), and every
field checked by its reader; a bad file is one ConfigError naming the file.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from ..errors import ConfigError

MAX_BYTES = 1 << 20


def looks_like_file(name: str) -> bool:
    """Whether a ``--compute``/``--network`` value names a file rather than a profile."""
    return os.sep in name or name.endswith((".yaml", ".yml", ".json")) or os.path.isfile(name)


def read_section(path: str, section: str, what: str, choices: str) -> dict[str, Any]:
    """The ``section`` mapping of the profile file at ``path``."""
    if not looks_like_file(path):
        raise ConfigError(f"unknown {what} {path!r}; choose one of: {choices}, or give a "
                          "profile file written by 'relaxsgd calibrate'")
    from ..userfiles import read_text
    from ..yamlio import load_yaml_text

    hint = f"choose one of: {choices}, or give a profile file written by 'relaxsgd calibrate'"
    data = load_yaml_text(read_text(path, f"{what} file", MAX_BYTES, hint),
                          f"{what} file {path!r}")
    sec = data.get(section) if isinstance(data, dict) else None
    if not isinstance(sec, dict):
        raise ConfigError(f"{what} file {path!r} has no '{section}' mapping; write it with "
                          "'relaxsgd calibrate'")
    return sec


def write_profile(path: str, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)
