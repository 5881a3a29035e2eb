"""QSGD-style uniform b-bit stochastic quantization (Alistarh et al., NeurIPS 2017, "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding").

Contract. ``x`` is cut into buckets of ``bucket`` consecutive elements (the last one may be
shorter). Each bucket has a float32 scale ``c`` (``norm="max"``: max |x_j| over the bucket;
``norm="l2"``: the bucket's Euclidean norm, as in QSGD). Every element is rounded
stochastically to one of the ``2^b`` equally spaced points ``-c + j * 2c / s``,
``j = 0 .. s`` with ``s = 2^b - 1`` intervals, up or down with the probabilities that make
the expectation exact: unbiased. The code ``j`` takes exactly ``b`` bits, sign included.

DECIDED: QSGD proper encodes a sign plus one of ``s + 1`` magnitude levels (0 included,
which makes small entries vanish); here the sign is folded into a symmetric grid so that
``b`` bits per element is exact and ``b = 1`` is meaningful (a stochastic scaled sign).
The default scale is the bucket's max-abs, which uses the whole grid and has a smaller
variance than the L2 norm; ``norm="l2"`` gives QSGD's own scaling.

Wire size: ``ceil(numel * b / 8)`` bytes of packed codes + 4 bytes per bucket for its
scale. Not summable: buckets of different workers have different scales, so the messages
are gathered, not all-reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..checks import require_int
from ..devices import draw
from ..errors import ConfigError
from .base import Compressor, check_flat, pack_bits, unpack_bits


@dataclass
class QSGDPayload:
    codes: Tensor  # uint8, ceil(numel * bits / 8) packed bytes
    scales: Tensor  # float32, one per bucket
    numel: int
    bits: int
    bucket: int


class QSGD(Compressor):
    """QSGD / uniform b-bit stochastic quantization per bucket (unbiased)"""

    name: ClassVar[str] = "qsgd"
    unbiased = True
    summable = False

    def __init__(self, bits: int = 8, bucket: int = 512, norm: str = "max") -> None:
        require_int(bits, "qsgd: bits (e.g. bits=8)", 1, 16)
        require_int(bucket, "qsgd: bucket (e.g. bucket=512)", at_least=1)
        if norm not in ("max", "l2"):
            raise ConfigError(f"qsgd: norm={norm!r} is unknown; use norm=max or norm=l2")
        self.bits = bits
        self.bucket = bucket
        self.norm = norm

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None) -> tuple[QSGDPayload, dict[str, Any]]:
        check_flat(x)
        n = x.numel()
        levels = (1 << self.bits) - 1
        pad = (-n) % self.bucket
        rows = torch.cat([x.detach().float(), x.new_zeros(pad, dtype=torch.float32)])
        rows = rows.view(-1, self.bucket)
        if self.norm == "max":
            scales = rows.abs().amax(1)
        else:
            scales = rows.norm(dim=1)
        safe = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
        # Position on the grid, in [0, levels]; round up with probability frac -> unbiased.
        t = ((rows / safe + 1.0) * (levels / 2.0)).clamp_(0.0, float(levels))
        u = draw(torch.rand, t.shape, generator=generator, device=t.device)
        low = t.floor()
        codes = (low + (u < (t - low)).float()).clamp_(0, levels).to(torch.int64)
        packed = pack_bits(codes.flatten()[:n], self.bits)
        return QSGDPayload(packed, scales, n, self.bits, self.bucket), state

    def decompress(self, payload: QSGDPayload) -> Tensor:
        n, b = payload.numel, payload.bucket
        levels = (1 << payload.bits) - 1
        codes = unpack_bits(payload.codes, payload.bits, n).to(torch.float32)
        scale = payload.scales.repeat_interleave(b)[:n]
        return scale * (codes * (2.0 / levels) - 1.0)

    def nbytes(self, payload: QSGDPayload) -> int:
        assert payload.codes.numel() == math.ceil(payload.numel * payload.bits / 8)
        return payload.codes.numel() + 4 * payload.scales.numel()
