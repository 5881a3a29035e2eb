"""Plain b-bit stochastic quantization of the difference to a shared reference (baseline).

QSGD-style (Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization
and Encoding", NeurIPS 2017), applied as SwarmSGD's baseline (ALGORITHMS.md: "plain QSGD /
uniform b-bit quantization of the model difference"): the sender quantizes ``d = x - ref``
and the receiver returns ``ref + Q(d)``.

Who holds the reference: both sides must hold the SAME tensor, bit for bit. The intended
choice is the receiver's last decoded copy of the sender's model: the receiver keeps it,
and the sender keeps it too by decoding its own payload after every send (decoding is
deterministic). Unlike the lattice quantizer, decoding never fails (``ok`` is always True);
the price is that the reference must be tracked per (sender, receiver) pair.

Quantizer, per bucket of ``bucket_size`` coordinates: scale ``s_B`` = the bucket's max
``|d_i|`` (``norm="max"``, default: lower variance at few bits) or its L2 norm
(``norm="l2"``, the form analysed in QSGD); ``L = 2^(bits-1) - 1`` levels a sign; each
coordinate becomes the integer ``l_i`` in ``[-L, L]`` by unbiased stochastic rounding of
``L d_i / s_B``; decoded ``d_i = s_B l_i / L``, so ``E[Q(d)] = d``. ``l_i + L`` is sent in
``bits`` bits (``2L + 1 < 2^bits`` codes), bit-packed; each bucket's scale as float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import require_int
from ..codec_meter import metered
from ..devices import draw
from ..errors import ConfigError
from .bitpack import pack_bits, unpack_bits

NORMS = ("max", "l2")


@dataclass(frozen=True)
class QSGDDiffPayload:
    """What travels: ``codes`` (bit-packed ``l + L``) and ``scales`` (float32, a bucket)."""

    codes: Tensor
    scales: Tensor
    bits: int
    numel: int
    shape: torch.Size
    dtype: torch.dtype


class QSGDDiffQuantizer:
    """unbiased b-bit stochastic quantization of the difference to a shared reference

    ``bits`` a coordinate (2..16; sign and level), ``bucket_size`` coordinates share one
    float32 scale, ``norm`` "max" or "l2". Same API as
    :class:`~relaxsgd.quantize.lattice.LatticeQuantizer`; ``decode`` never fails.
    """

    name = "qsgd"
    unbiased = True

    def __init__(self, bits: int = 8, bucket_size: int = 512, norm: str = "max") -> None:
        require_int(bits, "qsgd bits", 2, 16)
        require_int(bucket_size, "qsgd bucket_size", at_least=1)
        if norm not in NORMS:
            raise ConfigError(f"qsgd norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.bits, self.bucket_size, self.norm = bits, bucket_size, norm
        self.levels = (1 << (bits - 1)) - 1

    @metered("encoded", lambda out, a, k: out.numel, codec="qsgd-diff")
    def encode(self, x: Tensor, eps: float | None = None,
               generator: torch.Generator | None = None,
               reference: Tensor | None = None) -> QSGDDiffPayload:
        """Quantize ``x - reference`` (``reference`` required, shared with the receiver;
        ``eps`` is accepted for API parity with the lattice quantizer and ignored)."""
        if reference is None or reference.numel() != x.numel():
            raise ConfigError("qsgd encode needs reference= of the same size as x (the "
                              "receiver's last decoded copy of this model)")
        d = (x.detach().reshape(-1).to(torch.float64)
             - reference.detach().reshape(-1).to(torch.float64))
        numel, bs = d.numel(), self.bucket_size
        padded = d.new_zeros(math.ceil(numel / bs) * bs)
        padded[:numel] = d
        buckets = padded.view(-1, bs)
        amax = buckets.abs().amax(1)
        scale = amax if self.norm == "max" else buckets.norm(dim=1)
        # The scale travels as float32; round it up where float32 rounded it below the
        # bucket's largest entry, so that |y| <= L without clamping (clamping would bias).
        s32 = scale.to(torch.float32)
        scales = torch.where(s32.to(torch.float64) < amax,
                             torch.nextafter(s32, torch.full_like(s32, math.inf)), s32)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).to(torch.float64)
        y = buckets / safe[:, None] * self.levels
        low = torch.floor(y)
        u = draw(torch.rand, y.shape, generator=generator, dtype=torch.float64, device=y.device)
        level = low.to(torch.int64) + (u < (y - low)).to(torch.int64)  # E[level] = y
        codes = pack_bits(level.reshape(-1)[:numel] + self.levels, self.bits)
        return QSGDDiffPayload(codes, scales, self.bits, numel, x.shape, x.dtype)

    @metered("decoded", lambda out, a, k: out[0].numel(), codec="qsgd-diff")
    def decode(self, payload: QSGDDiffPayload, reference: Tensor) -> tuple[Tensor, bool]:
        """``(reference + Q(x - reference), True)``."""
        if reference.numel() != payload.numel:
            raise ConfigError(f"qsgd decode: reference has {reference.numel()} values, the "
                              f"payload {payload.numel}; decode against the shared reference")
        level = unpack_bits(payload.codes, payload.bits, payload.numel) - self.levels
        scale = payload.scales.to(torch.float64).repeat_interleave(self.bucket_size)
        d = level.to(torch.float64) * scale[:payload.numel] / self.levels
        x_hat = reference.detach().reshape(-1).to(torch.float64) + d
        return x_hat.to(payload.dtype).reshape(payload.shape), True

    def nbytes(self, payload: QSGDDiffPayload) -> int:
        """Bytes on the wire: ``ceil(numel*bits/8)`` codes + 4 a bucket for the scales."""
        return payload.codes.numel() + payload.scales.numel() * 4
