"""The one-peer exponential graph, directed and time-varying (SGP)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .base import Topology, require_int


class Exponential(Topology):
    """directed one-peer graph, at step k node i sends to i + 2^(k mod log2 n)

    The time-varying graph of Stochastic Gradient Push (Assran et al., "Stochastic Gradient
    Push for Distributed Deep Learning", ICML 2019): at step ``k`` node ``i`` sends to the
    single out-peer ``(i + 2^(k mod period)) mod n`` and receives from ``(i - 2^(k mod
    period)) mod n``, with ``period = ceil(log2 n)`` (1 for n <= 2). Hops ``2^j < n``, so a
    node never sends to itself. ``mixing_matrix(k)`` is the column-stochastic push matrix
    ``P``: node ``i`` keeps 1/2 and sends 1/2 (``P[i, i] = P[out(i), i] = 1/2``); as every
    node also receives exactly one message, ``P`` is in fact doubly stochastic, but not
    symmetric. ``neighbors(i, k)`` is ``[out-peer]``; ``in_neighbors(i, k)`` the sender.
    The seed is ignored.
    """

    name: ClassVar[str] = "exponential"
    directed: ClassVar[bool] = True

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__(require_int(n, "the node count of the exponential graph", 1))
        self.period = max(1, (n - 1).bit_length())  # = ceil(log2 n) for n >= 2

    def hop(self, step: int) -> int:
        """How far (mod n) every node sends at ``step``."""
        return 1 << (step % self.period)

    def neighbors(self, i: int, step: int = 0) -> list[int]:
        self._check_node(i)
        return [(i + self.hop(step)) % self.n] if self.n > 1 else []

    def in_neighbors(self, i: int, step: int = 0) -> list[int]:
        self._check_node(i)
        return [(i - self.hop(step)) % self.n] if self.n > 1 else []

    def mixing_matrix(self, step: int = 0) -> Tensor:
        if self.n == 1:
            return torch.ones(1, 1, dtype=torch.float64, device="cpu")  # pure data
        p = 0.5 * torch.eye(self.n, dtype=torch.float64, device="cpu")
        src = torch.arange(self.n, device="cpu")
        p[(src + self.hop(step)) % self.n, src] = 0.5
        return p
