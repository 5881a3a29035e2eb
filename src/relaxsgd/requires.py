"""One rule for options that take effect only with another option.

``compute.speed_factors`` does nothing unless ``compute.heterogeneity`` is ``fixed``;
``train.milestones`` nothing unless ``train.schedule`` is ``step``; a server's compressor
nothing without a server. Such an option given without what it needs is a user's mistake
that would otherwise be ignored without a word, so it is refused, everywhere the same way:
each config dataclass lists its dependent options in a class attribute ``NEEDS`` (a tuple
of :class:`Needs`), and its ``__post_init__`` calls :func:`check_needs`. An option counts as
given when its value differs from the field's default (a resolved ``config.yaml`` holds
every default, and reruns).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, shown


@dataclass(frozen=True)
class Needs:
    """``option`` takes effect only when ``active(config)`` holds, i.e. with ``needs``
    (written as a user would set it, e.g. ``"compute.heterogeneity=fixed"``)."""

    option: str
    active: Callable[[Any], bool]
    needs: str


def _default(cls: type, name: str) -> Any:
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):  # True == 1, but not as an option
        return a is b
    return bool(a == b)


def check_needs(config: Any, prefix: str) -> None:
    """ConfigError for the first option of ``type(config).NEEDS`` that is given (differs
    from its default) while what it needs is not; ``prefix`` names the section
    ("compute.", "swarm option ")."""
    for rule in getattr(type(config), "NEEDS", ()):
        value = getattr(config, rule.option)
        if _same(value, _default(type(config), rule.option)) or rule.active(config):
            continue
        raise ConfigError(f"{prefix}{rule.option}={shown(value)} takes effect only with "
                          f"{rule.needs}; set that too, or leave {prefix}{rule.option} out")
