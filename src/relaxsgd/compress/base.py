"""The compressor contract (DESIGN.md section 4).

A compressor acts on a flat float tensor and keeps its state explicit, so that a run can be
checkpointed: ``state = c.init_state(numel, layout)``; ``payload, state = c.compress(x,
state, generator)``; ``x_hat = c.decompress(payload)``; ``c.nbytes(payload)`` is the size
of the payload as it would really be encoded on the wire (values, indices, scales, bit
packing), not the size of the Python objects.

Flags: ``unbiased`` (E[decompress(compress(x))] = x over the generator's draws) and
``summable`` (payloads of several workers can be averaged element-wise, so an all-reduce can
carry them; otherwise they must be gathered).

Aggregation inside a worker program goes through :meth:`Compressor.mean`, a sub-program
that yields the communication effects it needs: one all-reduce for a summable compressor,
an all-gather otherwise, and PowerSGD's two all-reduces with warm start.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..algorithms.base import AllGather, AllReduce, Program

Layout = list[tuple[str, torch.Size]]


class Compressor:
    name: ClassVar[str] = ""
    unbiased: ClassVar[bool] = False
    summable: ClassVar[bool] = False

    def init_state(self, numel: int, layout: Layout | None = None) -> dict[str, Any]:
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
