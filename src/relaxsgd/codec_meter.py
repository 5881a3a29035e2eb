"""Codec work counted for the simulator: elements the code running now encoded and decoded.

The simulator runs the algorithms' real codecs but on a virtual clock, so the time they
take must be charged like a step's: the engine opens a :func:`metering` scope around each
stretch of a worker's program (up to its next effect) and around each handler, the codecs
:func:`note` the elements they code, and the engine delays what comes next (the message
that carries the code, the step that uses the decoded copy) by ``encoded x encode_s +
decoded x decode_s`` (:class:`~relaxsgd.sim.compute.ComputeModel`). In the distributed
runtime no scope is open and :func:`note` does nothing: the time is paid for real.

Counted: the quantizers' ``encode``/``decode`` (:mod:`relaxsgd.quantize`) and every
compressor's ``compress``/``decompress`` (:class:`~relaxsgd.compress.base.Compressor`,
the identity excepted), the outermost call only, its input's (compress) or output's
(decompress) number of elements. A context variable, so threads never see another's scope.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar


@dataclass
class CodecWork:
    """Elements encoded and decoded within one scope, in all and per codec (``by``:
    {codec name: [encoded, decoded]}, the names of :func:`codec_name`)."""

    encoded: int = 0
    decoded: int = 0
    by: dict[str, list[int]] = field(default_factory=dict)

    def add(self, encoded: int, decoded: int, codec: str = "") -> None:
        self.encoded += encoded
        self.decoded += decoded
        row = self.by.setdefault(codec, [0, 0])
        row[0] += encoded
        row[1] += decoded

    def merged(self, other: CodecWork | None) -> CodecWork:
        """This scope's work and ``other``'s together (a new object)."""
        out = CodecWork()
        for w in (self, other):
            for codec, (e, d) in (w.by.items() if w is not None else ()):
                out.add(e, d, codec)
        return out


def codec_name(obj: Any) -> str:
    """The name a codec's costs go by (a compute profile's ``codecs`` keys): its own
    ``codec_name`` (error feedback: its inner compressor's), else its class's ``name``
    (``topk``, ``powersgd``, ``lattice``, ...)."""
    return str(getattr(obj, "codec_name", None) or getattr(type(obj), "name", "") or "")


_SCOPE: ContextVar[CodecWork | None] = ContextVar("relaxsgd_codec_scope", default=None)
_DEPTH: ContextVar[int] = ContextVar("relaxsgd_codec_depth", default=0)
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def metering() -> Iterator[CodecWork]:
    """A scope whose codec work is counted in the yielded :class:`CodecWork`."""
    work = CodecWork()
    token = _SCOPE.set(work)
    try:
        yield work
    finally:
        _SCOPE.reset(token)


def note(encoded: int = 0, decoded: int = 0, codec: str = "") -> None:
    """Count coded elements of ``codec`` in the open scope (none open: nothing)."""
    work = _SCOPE.get()
    if work is not None:
        work.add(encoded, decoded, codec)


def metered(kind: str, count: Callable[[Any, tuple, dict], int],
            codec: str | None = None) -> Callable[[F], F]:
    """Decorate a codec method: ``count(result, args, kwargs)`` elements are noted as
    ``kind`` ("encoded" or "decoded") of ``codec`` (None: :func:`codec_name` of the
    method's object) when it is the outermost metered call (an error feedback wrapper's
    inner compressor, a quantizer's encode calling its encode_value, are part of the
    outer call's work)."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            depth = _DEPTH.get()
            token = _DEPTH.set(depth + 1)
            try:
                out = fn(*args, **kwargs)
            finally:
                _DEPTH.reset(token)
            if depth == 0 and _SCOPE.get() is not None:
                note(**{kind: count(out, args, kwargs)},
                     codec=codec if codec is not None else codec_name(args[0]))
            return out
        return inner  # type: ignore[return-value]
    return wrap
