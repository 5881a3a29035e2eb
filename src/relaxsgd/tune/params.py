"""The declaration types of a search space: what an algorithm file writes in its
``search_space`` class attribute, e.g. ``{"p": Int(1, 64, log=True)}``.

Pure data, no imports from the rest of the package (algorithm modules import this one).
Ranges are inclusive; ``log`` samples uniformly in the logarithm (rates, periods that
span orders of magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Float:
    """A real option in [low, high]; ``log``: sampled uniformly in log scale."""

    low: float
    high: float
    log: bool = False

    def bounds(self) -> tuple[Any, Any]:
        return self.low, self.high


@dataclass(frozen=True)
class Int:
    """An integer option in [low, high]; ``log``: sampled uniformly in log scale."""

    low: int
    high: int
    log: bool = False

    def bounds(self) -> tuple[Any, Any]:
        return self.low, self.high


@dataclass(frozen=True)
class Choice:
    """One of a few values (str, int, float or bool)."""

    choices: tuple[Any, ...]

    def bounds(self) -> tuple[Any, Any]:
        return self.choices[0], self.choices[-1]


Param = Float | Int | Choice


def contains(p: Param, value: Any) -> bool:
    """True when ``value`` is a value ``p`` can take."""
    if isinstance(p, Choice):
        return value in p.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(p, Int) and int(value) != value:
        return False
    return p.low <= value <= p.high
