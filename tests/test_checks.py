"""The one numeric check helper: integers and finite numbers in range, one line each."""

from __future__ import annotations

import math

import pytest

from relaxsgd.checks import require_float, require_int
from relaxsgd.errors import ConfigError


@pytest.mark.parametrize("value, kw, message", [
    (True, {}, "x must be an integer, got True"),
    (2.0, {"at_least": 1}, "x must be an integer >= 1, got 2.0"),
    ("3", {}, "x must be an integer, got '3'"),
    (0, {"at_least": 1}, "x must be an integer >= 1, got 0"),
    (17, {"at_least": 2, "at_most": 16}, "x must be an integer in 2..16, got 17"),
    (-1, {"at_most": -2}, "x must be an integer <= -2, got -1"),
])
def test_require_int_refuses(value, kw, message) -> None:
    with pytest.raises(ConfigError) as e:
        require_int(value, "x", **kw)
    assert str(e.value) == message


@pytest.mark.parametrize("value, kw, message", [
    (math.nan, {}, "y must be a finite number, got nan"),
    (math.inf, {"at_least": 0}, "y must be a finite number >= 0, got inf"),
    (-math.inf, {"allow_inf": True, "at_least": 0}, "y must be a number >= 0, got -inf"),
    (False, {}, "y must be a finite number, got False"),
    (0.0, {"above": 0}, "y must be a finite number > 0, got 0.0"),
    (1.0, {"at_least": 0, "below": 1}, "y must be a finite number >= 0 and < 1, got 1.0"),
    (2, {"at_most": 1.5}, "y must be a finite number <= 1.5, got 2"),
])
def test_require_float_refuses(value, kw, message) -> None:
    with pytest.raises(ConfigError) as e:
        require_float(value, "y", **kw)
    assert str(e.value) == message


def test_valid_values_come_back_typed() -> None:
    assert require_int(3, "x", 1, 3) == 3 and type(require_int(3, "x")) is int
    assert require_float(2, "y", above=0) == 2.0 and type(require_float(2, "y")) is float
    assert require_float(math.inf, "y", allow_inf=True) == math.inf
    assert require_float(0.0, "y", at_least=0, below=1) == 0.0
