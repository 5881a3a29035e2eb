"""The one place numeric options are checked: integers and finite numbers in a range.

Every config value that must be a whole number or a finite number goes through
:func:`require_int` or :func:`require_float`, so the checks (``True`` is not an integer,
``2.0`` is not accepted where an integer is wanted, NaN and infinities are refused unless
asked for) and the one-line messages are the same everywhere.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError, shown


def require_int(value: Any, what: str, at_least: int | None = None,
                at_most: int | None = None) -> int:
    """``value`` as an int in [at_least, at_most] (either bound optional), else one line."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and at_least is not None and value < at_least:
        ok = False
    if ok and at_most is not None and value > at_most:
        ok = False
    if not ok:
        raise ConfigError(f"{what} must be an integer{_range(at_least, at_most)}, "
                          f"got {shown(value)}")
    return int(value)


def require_float(value: Any, what: str, at_least: float | None = None,
                  at_most: float | None = None, above: float | None = None,
                  below: float | None = None, allow_inf: bool = False) -> float:
    """``value`` as a float, finite (unless ``allow_inf``) and in range, else one line.

    ``at_least``/``at_most`` are inclusive bounds, ``above``/``below`` exclusive ones.
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    x = float(value) if ok else math.nan
    if ok:
        ok = not math.isnan(x) and (allow_inf or math.isfinite(x))
    for bound, good in ((at_least, lambda b: x >= b), (at_most, lambda b: x <= b),
                        (above, lambda b: x > b), (below, lambda b: x < b)):
        if ok and bound is not None and not good(bound):
            ok = False
    if not ok:
        parts = [f">= {at_least:g}" if at_least is not None else "",
                 f"> {above:g}" if above is not None else "",
                 f"<= {at_most:g}" if at_most is not None else "",
                 f"< {below:g}" if below is not None else ""]
        cond = " and ".join(p for p in parts if p)
        kind = "a number" if allow_inf else "a finite number"
        raise ConfigError(f"{what} must be {kind}{' ' + cond if cond else ''}, "
                          f"got {shown(value)}")
    return x


def require_at_most(value: int | float, what: str, limit: int | float, why: str) -> None:
    """ConfigError if the (already checked) number ``value`` is above ``limit``; ``why``
    says what the bound protects (an upper bound kept apart from :func:`require_int`'s
    range, so the usual "must be an integer >= 1" line is unchanged for small values)."""
    if value > limit:
        raise ConfigError(f"{what} must be at most {limit:,} ({why}), got {value:,}")


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f" in {lo}..{hi}"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""
