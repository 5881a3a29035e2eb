"""Which device a run computes on: one rule for the simulator and the distributed runtime.

``auto`` is the first CUDA device when torch sees one, else the CPU; ``cpu``; ``cuda``
(the current CUDA device) or ``cuda:k``. Anything else, and CUDA asked for where there is
none (or not that many devices), is a :class:`ConfigError` naming what would be right.
"""

from __future__ import annotations

import re

import torch

from .errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:K")
_CUDA = re.compile(r"cuda(?::(\d{1,4}))?")


def check_device(spec: str) -> None:
    """ConfigError unless ``spec`` is spelt as a device choice (availability not checked)."""
    if not isinstance(spec, str) or not (spec in ("auto", "cpu") or _CUDA.fullmatch(spec)):
        raise ConfigError(f"unknown device {spec!r}; choose one of: {', '.join(DEVICES)} "
                          "(e.g. --device cuda:0)")


def resolve_device(spec: str) -> torch.device:
    """The torch.device ``spec`` names on this machine (``auto``: CUDA when present)."""
    check_device(spec)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for but torch sees no CUDA device on this "
                          "machine; use --device cpu (or auto)")
    m = _CUDA.fullmatch(spec)
    k = int(m.group(1)) if m and m.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if k >= count:
        raise ConfigError(f"device {spec!r} asked for but this machine has {count} CUDA "
                          f"device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", k)
