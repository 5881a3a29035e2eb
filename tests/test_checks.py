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


def _sites() -> list[tuple[str, object, str]]:
    """(id, a function of the bad value, the option's name as its message says it)."""
    from relaxsgd.algorithms.localsgd import LocalSGDConfig
    from relaxsgd.algorithms.olco3 import OLCO3Config
    from relaxsgd.algorithms.sgp import SGPConfig
    from relaxsgd.algorithms.swarm_config import SwarmConfig
    from relaxsgd.compress.powersgd import PowerSGD
    from relaxsgd.distributed.options import DistOptions
    from relaxsgd.quantize.lattice import LatticeQuantizer, choose_eps

    return [
        ("olco3.p", lambda v: OLCO3Config(p=v), "olco3 option p (local steps per round)"),
        ("olco3.s", lambda v: OLCO3Config(s=v), "olco3 option s (staleness in rounds)"),
        ("lattice", lambda v: LatticeQuantizer(bits=v), "lattice bits"),
        ("choose_eps", lambda v: choose_eps(1.0, v), "lattice bits"),
        ("powersgd.rank", lambda v: PowerSGD(rank=v), "powersgd: rank (e.g. rank=2)"),
        ("powersgd.power_iters", lambda v: PowerSGD(power_iters=v),
         "powersgd: power_iters (e.g. power_iters=1)"),
        ("swarm.H", lambda v: SwarmConfig(H=v), "swarm option H (local steps per interaction)"),
        ("swarm.bits", lambda v: SwarmConfig(bits=v), "swarm option bits (quantizer 'lattice')"),
        ("swarm.bucket_size", lambda v: SwarmConfig(bucket_size=v),
         "swarm option bucket_size"),
        ("spawn_groups", lambda v: DistOptions(spawn_groups=v), "RELAXSGD_SPAWN_GROUPS"),
        ("localsgd.p", lambda v: LocalSGDConfig(p=v), "localsgd option p (local steps per round)"),
        ("sgp.overlap", lambda v: SGPConfig(overlap=v), "sgp option overlap (steps of delay tau)"),
    ]


# (olco3.s: through its server, the default aggregation, s + 1 rounds are kept)
_RANGES = {"olco3.s": " in 0..63", "sgp.overlap": " >= 0", "lattice": " in 2..32",
           "spawn_groups": " in 1..64",
           "choose_eps": " in 2..32", "swarm.bits": " in 2..32"}


@pytest.mark.parametrize("site", range(len(_sites())), ids=[s[0] for s in _sites()])
@pytest.mark.parametrize("bad", [True, 2.0, -1, "3"], ids=repr)
def test_every_integer_option_is_checked_by_require_int(site: int, bad: object) -> None:
    """The integer options once checked by hand (isinstance, ``< 1``): ``True``, ``2.0``,
    ``-1`` and ``'3'`` are one line naming the option and what would be right."""
    key, make, name = _sites()[site]
    with pytest.raises(ConfigError) as e:
        make(bad)
    assert str(e.value) == f"{name} must be an integer{_RANGES.get(key, ' >= 1')}, got {bad!r}"


def test_swarm_bits_range_follows_the_quantizer() -> None:
    from relaxsgd.algorithms.swarm_config import SwarmConfig

    with pytest.raises(ConfigError, match=r"bits \(quantizer 'qsgd'\) must be an integer in "
                                          r"2\.\.16, got 17"):
        SwarmConfig(quantizer="qsgd", bits=17)
    assert SwarmConfig(quantizer="lattice", bits=17).bits == 17


@pytest.mark.parametrize("bad", [[True], [2.0], [-1], ["3"], [16, 0]], ids=repr)
def test_hidden_widths_are_integers(bad: list) -> None:
    from relaxsgd.tasks.base import check_hidden

    with pytest.raises(ConfigError) as e:
        check_hidden("logreg", bad)
    assert str(e.value) == (f"each width in option hidden={bad!r} of task 'logreg' "
                            f"(e.g. [256, 256]) must be an integer >= 1, got {bad[-1]!r}")


@pytest.mark.parametrize("bad", [True, 2.0, "3"], ids=repr)
def test_config_integers_refuse_bools_floats_and_strings(bad: object) -> None:
    """Every int field of a config (run, train, algorithm options) goes through
    require_int: ``2.0`` and ``'3'`` were accepted (as 2 and 3) before."""
    from relaxsgd.config import from_dict

    with pytest.raises(ConfigError) as e:
        from_dict({"workers": bad})
    assert str(e.value) == f"run.workers must be an integer, got {bad!r}"
