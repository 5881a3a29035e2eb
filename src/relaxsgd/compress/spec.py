"""Compressor spec strings: ``make_compressor("topk:ratio=0.01")``.

Grammar (whitespace around tokens is ignored)::

    spec    := "ef(" spec ")" | "ef:" spec | name [ ":" option ( "," option )* ]
    option  := key "=" value

``name`` is a key of :data:`relaxsgd.compress.COMPRESSORS`; ``key`` one of that class's
constructor keyword arguments (its options); ``value`` is converted to the option's
annotated type: int, float, bool (``true/false/yes/no/1/0``), str, or ``none`` for an
optional one. Examples: ``identity``, ``fp16``, ``qsgd:bits=4,bucket=256``, ``topk:k=100``,
``randk:ratio=0.1,scale=true``, ``powersgd:rank=2``, ``ef(topk:ratio=0.01)`` (error
feedback around top-k; ``ef:topk:ratio=0.01`` is the same). Every mistake raises
:class:`ConfigError` with one line naming what would be right. ``c.spec`` gives back the
canonical string, so ``make_compressor(c.spec)`` rebuilds an equal compressor.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from ..errors import ConfigError
from . import COMPRESSORS
from .base import Compressor
from .error_feedback import ErrorFeedback

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def make_compressor(spec: str | Compressor) -> Compressor:
    """The compressor a spec string describes (a :class:`Compressor` is returned as is)."""
    if isinstance(spec, Compressor):
        return spec
    s = spec.strip()
    if s.startswith("ef(") or s == "ef":
        if not s.endswith(")"):
            raise ConfigError(f"compressor spec {spec!r}: error feedback is written "
                              "ef(<spec>), e.g. ef(topk:ratio=0.01)")
        return _error_feedback(spec, make_compressor(s[3:-1]))
    if s.startswith("ef:"):
        return _error_feedback(spec, make_compressor(s[3:]))
    name, _, rest = (part.strip() for part in s.partition(":"))
    if name not in COMPRESSORS:
        raise ConfigError(f"unknown compressor {name!r}; choose one of: "
                          f"{', '.join(COMPRESSORS.names())} (or ef(<spec>) for error feedback)")
    cls = COMPRESSORS.get(name)
    return cls(**_parse_options(cls, name, rest))


def _error_feedback(spec: str, inner: Compressor) -> ErrorFeedback:
    if isinstance(inner, ErrorFeedback):  # two residuals would feed back the error twice
        raise ConfigError(f"compressor spec {spec!r}: error feedback is applied once; "
                          f"write {inner.spec}")
    return ErrorFeedback(inner)


def _parse_options(cls: type[Compressor], name: str, text: str) -> dict[str, Any]:
    options = cls.options()
    hints = typing.get_type_hints(cls.__init__)
    known = ", ".join(options) if options else "(it takes no options)"
    kwargs: dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = (t.strip() for t in item.partition("="))
        if not eq or not key:
            raise ConfigError(f"compressor {name}: {item!r} is not key=value, e.g. "
                              f"{name}:{next(iter(options), 'key')}=...")
        if key not in options:
            raise ConfigError(f"compressor {name} has no option {key!r}; its options: {known}")
        if key in kwargs:
            raise ConfigError(f"compressor {name}: option {key!r} is given twice")
        kwargs[key] = _convert(name, key, value, hints.get(key, type(options[key])))
    if "ratio" in kwargs and kwargs.get("k") is not None:  # k would silently win
        raise ConfigError(f"compressor {name}: give ratio or k, not both "
                          f"(e.g. {name}:ratio={kwargs['ratio']} or {name}:k={kwargs['k']})")
    return kwargs


def _convert(name: str, key: str, value: str, hint: Any) -> Any:
    """``value`` as the annotated type of the option; ConfigError if it is not one."""
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) or \
        typing.get_origin(hint) is typing.Union else (hint,)
    low = value.lower()
    if type(None) in kinds and low in ("none", "null"):
        return None
    for kind in kinds:
        if kind is bool:
            if low in _TRUE | _FALSE:
                return low in _TRUE
        elif kind is int:
            try:
                return int(value)
            except ValueError:
                pass
        elif kind is float:
            try:
                return float(value)
            except ValueError:
                pass
        elif kind is str:
            return value
    wanted = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
    raise ConfigError(f"compressor {name}: {key}={value!r} is not a valid {wanted}")
