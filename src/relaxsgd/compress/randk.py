"""Random-k sparsification (Stich et al., NeurIPS 2018, "Sparsified SGD with Memory";
Wangni et al. 2018).

Contract: keep ``k`` entries chosen uniformly without replacement (``k`` given, or
``ceil(ratio * numel)``), drawn from the generator passed to ``compress`` (the global torch
generator if none). ``scale=True`` multiplies the kept values by ``numel / k``, which makes
the compressor unbiased; the default ``scale=False`` is the biased contraction that error
feedback wants (scaled random-k is not a contraction and can make error feedback diverge).

``shared_seed``: when set, the indices come from a generator seeded by ``(shared_seed,
step)`` with ``step`` a counter in the state, so every worker picks the same indices at the
same call: the messages are then summable (an all-reduce of ``k`` values), and the indices
need not travel since every receiver regenerates them.

Wire size: ``8 k`` bytes (float32 values + int32 indices), or ``4 k`` with ``shared_seed``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..devices import draw
from .base import Compressor, check_flat, count_k
from .topk import SparsePayload, check_k


class RandK(Compressor):
    """random-k sparsification: k uniformly random entries (optionally scaled by d/k)"""

    name: ClassVar[str] = "randk"

    def __init__(self, ratio: float = 0.01, k: int | None = None, scale: bool = False,
                 shared_seed: int | None = None) -> None:
        check_k("randk", ratio, k)
        self.ratio = float(ratio)
        self.k = k
        self.scale = bool(scale)
        self.shared_seed = shared_seed
        self.unbiased = self.scale
        self.summable = shared_seed is not None

    def init_state(self, numel: int, layout: Any = None,
                   device: torch.device | str | None = None) -> dict[str, Any]:
        return {"step": 0}

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None) -> tuple[SparsePayload, dict[str, Any]]:
        check_flat(x)
        n = x.numel()
        k = count_k(n, self.ratio, self.k)
        step = int(state.get("step", 0))
        gen = generator
        if self.shared_seed is not None:
            # Same seed and step on every worker -> the same indices everywhere.
            gen = torch.Generator().manual_seed((self.shared_seed * 1_000_003 + step) % 2**62)
        idx = draw(torch.randperm, n, generator=gen, device=x.device)[:k]
        vals = x.detach()[idx].to(torch.float32)
        if self.scale:
            vals = vals * (n / k)
        payload = SparsePayload(vals, idx.to(torch.int32), n,
                                index_bytes=0 if self.summable else 4)
        return payload, {**state, "step": step + 1}

    def decompress(self, payload: SparsePayload) -> Tensor:
        return payload.dense()

    def nbytes(self, payload: SparsePayload) -> int:
        return payload.wire_bytes()
