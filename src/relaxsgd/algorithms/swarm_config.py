"""SwarmSGD's options (see :mod:`.swarm` for the math and :mod:`.swarm_codec` for the
lattice's safety rule); every bad value is a one-line ConfigError naming the option."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import require_int
from ..errors import ConfigError
from ..requires import Needs, check_needs
from .swarm_codec import MIN_SAFETY, safety_cap

SCHEDULES = ("async", "sequential")
STEP_DISTS = ("fixed", "geometric")
AVERAGING = ("nonblocking", "blocking")
UPDATES = ("symmetric", "pull")
QUANTIZERS = ("none", "lattice", "qsgd")
SMALL = 8  # bytes of a control message (op code and a sequence number)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"swarm option {name}={value!r} is unknown; choose one of: "
                          f"{', '.join(choices)}")


@dataclass(frozen=True)
class SwarmConfig:
    """Options of SwarmSGD (see the module docstring for the math).

    schedule: "async" (each worker picks a random neighbour after its local steps) or
        "sequential" (a shared seeded stream of random edges; the analysed model).
    H: local steps per interaction (the mean when ``steps_dist`` is "geometric").
    steps_dist: "geometric" (H_i ~ Geometric(1/H) on 1, 2, ..., the default: it keeps the
        workers out of lockstep, see the module docstring) or "fixed" (exactly H).
    averaging: "nonblocking" (average published copies, keep own progress) or "blocking"
        (the partner averages its current model at its next step boundary).
    update: "symmetric" (both sides update) or "pull" (only the initiator updates).
    quantizer: "none", "lattice" (decoded against the receiver's copy) or "qsgd" (b-bit
        difference to a per-pair reference).
    bits: bits per coordinate of the quantizer (lattice 2..32, qsgd 2..16).
    eps: fixed lattice step; None chooses it from the observed spread of the models.
    safety: lattice margin: eps = safety * expected gap / (2^(bits-1) - 1) (capped at
        (2^(bits-1) - 1) / 4.5, see :func:`effective_safety`; adaptive eps needs bits >= 4).
    bucket_size: qsgd coordinates per float32 scale.
    per_tensor: lattice: one eps (and checksum) per parameter tensor, each from that
        tensor's own spread (layers disagree by different amounts); False: one for all.
    spread_decay: lattice: the spread is max(last gap seen, spread_decay * previous
        spread), a decaying maximum over partners (0: the last gap only).
    exact_mean: update by (Q(c_j) - Q(c_i)) / 2, which keeps the sum of the models exactly
        under quantization; False uses (Q(c_i) + Q(c_j)) / 2 - c_i.
    overlap: async non-blocking only: the initiator computes its next local steps while
        its exchange is in flight and applies the average at their end.
    """

    schedule: str = "async"
    # Defaults: the paper's whole system (non-blocking averaging of published copies,
    # quantized by the 8-bit lattice), with H = 4 as in relaxsgd compare's default job.
    H: int = 4
    steps_dist: str = "geometric"
    averaging: str = "nonblocking"
    update: str = "symmetric"
    quantizer: str = "lattice"
    bits: int = 8
    eps: float | None = None
    safety: float = 2.0
    bucket_size: int = 512
    per_tensor: bool = True
    spread_decay: float = 0.9
    exact_mean: bool = True
    overlap: bool = False

    def __post_init__(self) -> None:
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("steps_dist", self.steps_dist, STEP_DISTS)
        _choice("averaging", self.averaging, AVERAGING)
        _choice("update", self.update, UPDATES)
        _choice("quantizer", self.quantizer, QUANTIZERS)
        require_int(self.H, "swarm option H (local steps per interaction)", at_least=1)
        hi = 16 if self.quantizer == "qsgd" else 32
        require_int(self.bits, f"swarm option bits (quantizer {self.quantizer!r})", 2, hi)
        if self.eps is not None and not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(f"swarm option eps must be > 0 (or null: chosen from the "
                              f"models' spread), got {self.eps}")
        if not (self.safety > 0 and math.isfinite(self.safety)):
            raise ConfigError(f"swarm option safety must be > 0, got {self.safety}")
        if self.quantizer == "lattice" and self.eps is None and safety_cap(self.bits) < MIN_SAFETY:
            raise ConfigError(f"swarm option bits={self.bits} is too few for the lattice "
                              f"with adaptive eps (its rounding noise would outgrow the "
                              f"decode radius; measured: 3 bits diverged); use bits >= 4 "
                              f"or a fixed eps")
        if not 0 <= self.spread_decay < 1:
            raise ConfigError(f"swarm option spread_decay must be in [0, 1), "
                              f"got {self.spread_decay}")
        require_int(self.bucket_size, "swarm option bucket_size", at_least=1)
        check_needs(self, "swarm option ")

    NEEDS = (Needs("bits", lambda c: c.quantizer != "none", "quantizer=lattice or qsgd"),
             *(Needs(k, lambda c: c.quantizer == "lattice", "quantizer=lattice")
               for k in ("eps", "safety", "per_tensor", "spread_decay")),
             Needs("bucket_size", lambda c: c.quantizer == "qsgd", "quantizer=qsgd"),
             Needs("overlap", lambda c: c.schedule == "async" and c.averaging == "nonblocking",
                   "schedule=async and averaging=nonblocking"))
