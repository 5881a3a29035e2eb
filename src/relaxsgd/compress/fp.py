"""Half-precision casts: fp16 and bf16 (2 bytes per element).

Deterministic round-to-nearest casts, so biased (by at most half an ulp per element; fp16
also overflows to inf beyond 65504 and flushes tiny values to zero) but summable: the
all-reduce carries 16-bit values. In the simulator the mean is taken of the decoded float32
values and costed at 2 bytes per element; a real 16-bit all-reduce accumulates in 16 bits,
which can differ from it in the last bits.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Compressor, check_flat


class _Cast(Compressor):
    dtype: ClassVar[torch.dtype] = torch.float16
    unbiased = False
    summable = True

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        check_flat(x)
        return x.detach().to(self.dtype, copy=True), state

    def decompress(self, payload: Tensor) -> Tensor:
        return payload.to(torch.float32)

    def nbytes(self, payload: Tensor) -> int:
        return payload.numel() * 2


class FP16(_Cast):
    """IEEE half precision (fp16) cast: 2 bytes per element, round to nearest"""

    name: ClassVar[str] = "fp16"
    dtype: ClassVar[torch.dtype] = torch.float16


class BF16(_Cast):
    """bfloat16 cast: 2 bytes per element, float32's range with 8 bits of mantissa"""

    name: ClassVar[str] = "bf16"
    dtype: ClassVar[torch.dtype] = torch.bfloat16
