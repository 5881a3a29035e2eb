"""The compressor contract (DESIGN.md section 4).

A compressor acts on a flat float tensor and keeps its state explicit, so that a run can be
checkpointed: ``state = c.init_state(numel, layout, device)``; ``payload, state =
c.compress(x, state, generator)``; ``x_hat = c.decompress(payload)``; ``c.nbytes(payload)``
is the size of the payload as it would really be encoded on the wire (values, indices, scales, bit
packing), not the size of the Python objects.

Rules every compressor follows (the conformance suite in ``tests/test_compress.py`` checks
them): ``compress`` is pure (it never writes into ``x`` or into the old state, and the
payload never aliases ``x``); ``decompress`` returns a fresh flat float32 tensor of
``numel`` elements; the same generator seed gives the same payload; the state holds only
tensors, ints and plain containers of them (``torch.save`` can checkpoint it).

Devices: ``init_state`` makes its tensors on ``device`` (the device of the vectors that
will be compressed); ``compress`` and ``decompress`` make theirs on the device of ``x`` and
of the payload, and draw random numbers on the generator's device (the CPU), copying them
once to ``x``'s (:func:`relaxsgd.devices.draw`): a seed gives the same payload on the CPU
and on CUDA.

Flags: ``unbiased`` (E[decompress(compress(x))] = x over the generator's draws) and
``summable`` (payloads of several workers can be averaged element-wise, so an all-reduce can
carry them; otherwise they must be gathered). Flags are class attributes that an instance
may override when they depend on its options (random-k with ``scale`` or ``shared_seed``).

Aggregation inside a worker program goes through :meth:`Compressor.mean`, a sub-program
that yields the communication effects it needs: one all-reduce for a summable compressor,
an all-gather otherwise, and PowerSGD's two all-reduces with warm start.

Options: a compressor's constructor keyword arguments (each with a default) are its options;
the constructor validates them and stores each one as an attribute of the same name, so
that :attr:`Compressor.spec` can print the canonical spec string (see ``spec.py``).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..algorithms.base import AllGather, AllReduce, Program
from ..codec_meter import metered
from ..errors import ConfigError

Layout = list[tuple[str, torch.Size]]


def _compressed(out: Any, args: tuple, kwargs: dict) -> int:
    x = args[1] if len(args) > 1 else kwargs["x"]
    return x.numel() if args[0].codes else 0


def _decompressed(out: Any, args: tuple, kwargs: dict) -> int:
    return out.numel() if args[0].codes and isinstance(out, Tensor) else 0


class Compressor:
    name: ClassVar[str] = ""
    unbiased: bool = False
    summable: bool = False
    codes: ClassVar[bool] = True  # False: nothing is coded (the identity), no codec time

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every compressor's own compress/decompress is metered for the simulator's
        codec time (:mod:`relaxsgd.codec_meter`)."""
        super().__init_subclass__(**kwargs)
        for name, kind, count in (("compress", "encoded", _compressed),
                                  ("decompress", "decoded", _decompressed)):
            if name in cls.__dict__:
                setattr(cls, name, metered(kind, count)(cls.__dict__[name]))

    def init_state(self, numel: int, layout: Layout | None = None,
                   device: torch.device | str | None = None) -> dict[str, Any]:
        return {}

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def decompress(self, payload: Any) -> Tensor:
        raise NotImplementedError

    def nbytes(self, payload: Any) -> int:
        raise NotImplementedError

    def mean(self, x: Tensor, state: dict[str, Any],
             generator: torch.Generator | None = None) -> Program:
        """Sub-program: the (approximate) mean of ``x`` over all workers.

        Returns ``(mean, own_decompressed, state)``; ``own_decompressed`` is what this
        worker's message decodes to (error feedback needs it).
        """
        payload, state = self.compress(x, state, generator)
        own = self.decompress(payload)
        if self.summable:
            mean = yield AllReduce(own, nbytes=self.nbytes(payload))
        else:
            payloads = yield AllGather(payload, nbytes=self.nbytes(payload))
            mean = torch.stack([self.decompress(p) for p in payloads]).mean(0)
        return mean, own, state

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The options (constructor keyword arguments) and their defaults, in order."""
        params = inspect.signature(cls.__init__).parameters
        return {k: p.default for k, p in params.items()
                if k != "self" and p.default is not inspect.Parameter.empty}

    @property
    def spec(self) -> str:
        """Canonical spec string (``name:opt=value,...``, non-default options only)."""
        opts = [f"{k}={_fmt(getattr(self, k))}" for k, d in self.options().items()
                if getattr(self, k) != d]
        return self.name + (":" + ",".join(opts) if opts else "")

    def __repr__(self) -> str:
        return f"<compressor {self.spec}>"


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "none" if v is None else str(v)


# --- shared helpers ------------------------------------------------------------------------

def check_flat(x: Tensor) -> None:
    """Compressors take flat float tensors; anything else is a caller bug."""
    if x.dim() != 1 or not x.is_floating_point():
        raise ValueError(f"compressors take a flat float tensor, got shape {tuple(x.shape)} "
                         f"and dtype {x.dtype}")


def check_ratio(ratio: float, what: str) -> None:
    if not (0.0 < ratio <= 1.0) or math.isnan(ratio):
        raise ConfigError(f"{what}: ratio={ratio} is outside (0, 1]; use e.g. ratio=0.01")


def count_k(numel: int, ratio: float, k: int | None) -> int:
    """Entries to keep: ``k`` if given, else ``ceil(ratio * numel)``; at least 1, at most numel.

    The ``- 1e-9`` keeps ``0.01 * 1000`` (10.000000000000002 in floats) at 10.
    """
    want = k if k is not None else math.ceil(ratio * numel - 1e-9)
    return max(1, min(numel, want))


_CHUNK = 1 << 18  # codes per chunk: a multiple of 8, so chunks end on byte boundaries


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into ``ceil(len * bits / 8)`` bytes.

    Big-endian within each code and each byte; the tail of the last byte is zero. This is the
    real wire encoding, so ``packed.numel()`` is the byte count that ``nbytes`` reports.
    Works in chunks so that the bit matrix stays small for large models.
    """
    if bits == 8:
        return codes.to(torch.uint8)
    return torch.cat([_pack(c, bits) for c in codes.split(_CHUNK)]) if codes.numel() \
        else codes.new_zeros(0, dtype=torch.uint8)


def _pack(codes: Tensor, bits: int) -> Tensor:
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64, device=codes.device)
    flat = ((codes.to(torch.int64).unsqueeze(1) >> shifts) & 1).to(torch.uint8).flatten()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes, as int64."""
    if bits == 8:
        return packed[:count].to(torch.int64)
    step = _CHUNK * bits // 8  # bytes per chunk of codes
    parts = [_unpack(packed[i:i + step], bits, min(_CHUNK, count - i // bits * 8))
             for i in range(0, packed.numel(), step)]
    return torch.cat(parts) if parts else packed.new_zeros(0, dtype=torch.int64)


def _unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    byte_shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    flat = ((packed.unsqueeze(1) >> byte_shifts) & 1).flatten()
    mat = flat[: count * bits].view(count, bits).to(torch.int64)
    return (mat << torch.arange(bits - 1, -1, -1, dtype=torch.int64, device=mat.device)).sum(1)
