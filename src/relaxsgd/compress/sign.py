"""Scaled sign compression (Karimireddy et al., ICML 2019, "Error Feedback Fixes SignSGD and
other Gradient Compression Schemes").

Contract: ``C(x) = (||x||_1 / d) * sign(x)`` with ``d = numel``; one bit per element
(zeros are sent as +, a one-bit code has no room for 0) and one float32 scale for the whole
vector. Deterministic and biased; a contraction, so meant to be used with error feedback
(EF-SignSGD). Not summable: the scales differ between workers.

Wire size: ``ceil(numel / 8) + 4`` bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Compressor, check_flat, pack_bits, unpack_bits


@dataclass
class SignPayload:
    signs: Tensor  # uint8, packed bits, 1 = negative
    scale: Tensor  # float32 scalar
    numel: int


class ScaledSign(Compressor):
    """scaled sign (EF-SignSGD): 1 bit per element and one scale ||x||_1 / d"""

    name: ClassVar[str] = "sign"
    unbiased = False
    summable = False

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None) -> tuple[SignPayload, dict[str, Any]]:
        check_flat(x)
        x = x.detach().float()
        scale = x.abs().sum() / max(1, x.numel())
        return SignPayload(pack_bits((x < 0).to(torch.int64), 1), scale, x.numel()), state

    def decompress(self, payload: SignPayload) -> Tensor:
        neg = unpack_bits(payload.signs, 1, payload.numel).to(torch.float32)
        return payload.scale * (1.0 - 2.0 * neg)

    def nbytes(self, payload: SignPayload) -> int:
        return payload.signs.numel() + 4
