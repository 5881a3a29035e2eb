"""The worker object that algorithm programs see, the same in both runtimes.

It implements :class:`relaxsgd.algorithms.base.Worker` on top of one row of a
:class:`relaxsgd.bank.Bank`. Counters and observations are kept per worker and summed or
averaged into ``metrics.csv`` by the runner.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .bank import Bank
from .salts import ALGO as SALT_ALGO
from .training import seeded_generator


class LocalWorker:
    """One worker: its row in the bank, its algorithm state, its counters."""

    # set by a runtime whose server rounds are quorum rounds (churn, an elastic job)
    ordered_server_rounds = False

    def __init__(self, bank: Bank, row: int, n: int, seed: int, total_steps: int,
                 on_step: Callable[[int], None] | None = None) -> None:
        self.bank = bank
        self.row = row
        self.rank = bank.ranks[row]
        self.n = n
        self.params: Tensor = bank.X[row]
        self.momentum: Tensor = bank.M[row]
        self.layout = bank.layout
        self.state: dict[str, Any] = {}
        self.rng: torch.Generator = seeded_generator(seed, self.rank, SALT_ALGO)
        self.total_steps = total_steps
        self.counters: dict[str, float] = {}
        self.obs_sum: dict[str, float] = {}
        self.obs_count: dict[str, int] = {}
        self.samples = 0
        self._on_step = on_step

    @property
    def step(self) -> int:
        return self.bank.steps[self.row]

    def lr(self) -> float:
        return self.bank.lr(self.row)

    def apply_grad(self, grad: Tensor) -> None:
        self.bank.apply_grad(self.row, grad)
        if self._on_step is not None:
            self._on_step(1)

    def note_steps(self, steps: int) -> None:
        """Called by the runtime after it ran ``steps`` local steps for this worker."""
        if self._on_step is not None:
            self._on_step(steps)

    def count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, key: str, value: float) -> None:
        self.obs_sum[key] = self.obs_sum.get(key, 0.0) + float(value)
        self.obs_count[key] = self.obs_count.get(key, 0) + 1

    def __repr__(self) -> str:
        return f"Worker(rank={self.rank}, step={self.step}/{self.total_steps})"
