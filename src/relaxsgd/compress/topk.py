"""Top-k sparsification (Aji & Heafield 2017; Stich et al., NeurIPS 2018, "Sparsified SGD
with Memory"; with error feedback it is the compressor of Qsparse-local-SGD and OLCO3-TC).

Contract: keep the ``k`` entries of largest magnitude (``k`` given, or ``ceil(ratio *
numel)``, at least 1, at most numel), zero the rest. Deterministic and biased (it is a
contraction, ``||x - C(x)||^2 <= (1 - k/d) ||x||^2``, which is what error feedback needs).
Not summable: each worker keeps different indices, so the messages are gathered.

Wire size: ``8 k`` bytes: ``k`` float32 values + ``k`` int32 indices. DECIDED: plain 4-byte
indices rather than ``ceil(log2(numel))``-bit packed ones, the format every all-gather of
sparse tensors uses in practice; at ``ratio > 1/2`` this exceeds the dense size, so use
small ratios (or a dense compressor) there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..checks import require_int
from .base import Compressor, check_flat, check_ratio, count_k


@dataclass
class SparsePayload:
    values: Tensor  # float32, k
    indices: Tensor  # int32, k
    numel: int
    index_bytes: int = 4  # per index on the wire (0 when the receiver knows the indices)

    def dense(self) -> Tensor:
        out = self.values.new_zeros(self.numel, dtype=torch.float32)
        out[self.indices.long()] = self.values
        return out

    def wire_bytes(self) -> int:
        return self.values.numel() * (4 + self.index_bytes)


def check_k(who: str, ratio: float, k: int | None) -> None:
    check_ratio(ratio, who)
    if k is not None:
        require_int(k, f"{who}: k (a positive integer, or omit it to use ratio)", at_least=1)


class TopK(Compressor):
    """top-k sparsification: the k largest-magnitude entries, values + int32 indices"""

    name: ClassVar[str] = "topk"
    unbiased = False
    summable = False

    def __init__(self, ratio: float = 0.01, k: int | None = None) -> None:
        check_k("topk", ratio, k)
        self.ratio = float(ratio)
        self.k = k

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None) -> tuple[SparsePayload, dict[str, Any]]:
        check_flat(x)
        k = count_k(x.numel(), self.ratio, self.k)
        idx = torch.topk(x.detach().abs(), k, sorted=False).indices
        vals = x.detach()[idx].to(torch.float32)  # advanced indexing copies
        return SparsePayload(vals, idx.to(torch.int32), x.numel()), state

    def decompress(self, payload: SparsePayload) -> Tensor:
        return payload.dense()

    def nbytes(self, payload: SparsePayload) -> int:
        return payload.wire_bytes()
