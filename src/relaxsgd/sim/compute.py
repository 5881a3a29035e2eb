"""The simulator's compute model: the virtual duration of local steps, per worker.

``step_time_s`` is one local step of the reference worker: measured on this machine at the
start of the run (median of a few real steps of worker 0's model and batch) unless the
config sets it ("what if each step took 0.2 s on a V100"). Heterogeneity multiplies it:

- ``none``: all workers equal;
- ``fixed``: ``speed_factors[i]`` per worker (2.0 = twice as slow); a list shorter than n
  repeats;
- ``lognormal``: a factor exp(N(0, sigma^2)) per worker, drawn once (seeded);
- ``stragglers``: each step is slowed by ``straggler_f`` with probability ``straggler_p``,
  drawn per step from the worker's own seeded stream (so event order never changes it).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ..checks import require_float
from ..errors import ConfigError

KINDS = ("none", "fixed", "lognormal", "stragglers")


@dataclass(frozen=True)
class ComputeConfig:
    step_time_s: float | None = None
    heterogeneity: str = "none"
    speed_factors: tuple[float, ...] = field(default=())
    sigma: float = 0.5
    straggler_p: float = 0.05
    straggler_f: float = 5.0

    def __post_init__(self) -> None:
        if self.step_time_s is not None:
            require_float(self.step_time_s, "compute.step_time_s (seconds; null to measure)",
                          above=0)
        if self.heterogeneity not in KINDS:
            raise ConfigError(f"unknown compute.heterogeneity {self.heterogeneity!r}; "
                              f"choose one of: {', '.join(KINDS)}")
        if self.heterogeneity == "fixed" and not self.speed_factors:
            raise ConfigError("compute.heterogeneity 'fixed' needs compute.speed_factors, "
                              "e.g. [1, 1, 3]")
        for f in self.speed_factors:
            require_float(f, "each of compute.speed_factors", above=0)
        require_float(self.sigma, "compute.sigma", at_least=0)
        require_float(self.straggler_p, "compute.straggler_p", at_least=0, at_most=1)
        require_float(self.straggler_f, "compute.straggler_f", at_least=1)


class ComputeModel:
    def __init__(self, cfg: ComputeConfig, n: int, seed: int, step_time_s: float) -> None:
        self.cfg = cfg
        self.step_time = step_time_s
        self.rngs = [random.Random(seed * 1_000_033 + i) for i in range(n)]
        if cfg.heterogeneity == "fixed":
            f = cfg.speed_factors
            self.factors = [float(f[i % len(f)]) for i in range(n)]
        elif cfg.heterogeneity == "lognormal":
            self.factors = [math.exp(r.gauss(0.0, cfg.sigma)) for r in self.rngs]
        else:
            self.factors = [1.0] * n

    def duration(self, rank: int, steps: int) -> float:
        base = self.step_time * self.factors[rank]
        if self.cfg.heterogeneity != "stragglers":
            return base * steps
        r, p, f = self.rngs[rank], self.cfg.straggler_p, self.cfg.straggler_f
        slow = sum(1 for _ in range(steps) if r.random() < p)
        return base * (steps + (f - 1) * slow)
