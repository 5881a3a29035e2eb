"""The identity compressor: the uncompressed float32 baseline.

Payload: a copy of ``x`` (4 bytes per element on the wire). Unbiased (exact) and summable,
so :meth:`Compressor.mean` is one plain all-reduce: the reference every other compressor is
compared against.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from .base import Compressor, check_flat


class Identity(Compressor):
    """no compression: float32 values, 4 bytes per element (the baseline)"""

    name: ClassVar[str] = "identity"
    unbiased = True
    summable = True
    codes: ClassVar[bool] = False  # a copy: no codec time in the simulator

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        check_flat(x)
        # A copy, not x itself: the payload may be in flight while the caller updates x.
        return x.detach().to(torch.float32, copy=True), state

    def decompress(self, payload: Tensor) -> Tensor:
        return payload.clone()

    def nbytes(self, payload: Tensor) -> int:
        return payload.numel() * 4
