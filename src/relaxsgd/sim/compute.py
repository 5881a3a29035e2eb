"""The simulator's compute model: the virtual duration of local steps, per worker.

The step time of the reference worker is, by default, **derived, not measured**, so a run
gives the same result on any machine whatever its load::

    step_time_s = (overhead_s + flops_per_sample * batch_size / flops_per_s) * max(1, wpc)

``flops_per_sample`` is the model's forward + backward cost, counted once with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions; the
elementwise work and the optimizer's update are in ``overhead_s``), ``flops_per_s`` and
``overhead_s`` come from a named compute profile (:data:`PROFILES`) or a calibrated
profile file (``relaxsgd calibrate``), and ``wpc`` is ``compute.workers_per_core``: when a
real run puts k worker processes on each core, each gets 1/k of it.

Other sources of the step time, each an explicit choice: ``step_time_s: <seconds>`` ("what
if each step took 0.2 s") and ``step_time_s: measure`` (median of a few real steps of
worker 0's model on this machine, at the start of the run: machine- and load-dependent).

Heterogeneity multiplies the step time:

- ``none``: all workers equal;
- ``fixed``: ``speed_factors[i]`` per worker (2.0 = twice as slow); a list shorter than n
  repeats;
- ``lognormal``: a factor exp(N(0, sigma^2)) per worker, drawn once (seeded);
- ``stragglers``: each step is slowed by ``straggler_f`` with probability ``straggler_p``,
  drawn per step from the worker's own seeded stream (so event order never changes it);
- ``jitter``: each stretch of local computation (one ``Compute``/``Grad`` effect) takes
  ``exp(N(-sigma^2/2, sigma^2))`` times its length, a fresh draw from the worker's own
  stream each time; mean one, so the step time stays the mean step. This is the noise of
  a shared machine (processes contending for cores, the OS): a synchronous round waits
  for the slowest of the n, so its compute is ``step x E[max of n draws]``
  (:func:`expected_max_lognormal`), not the mean step;
- ``calibrated``: ``jitter`` with the ``step_sigma`` that ``relaxsgd calibrate`` measured
  (the compute profile must be such a file).

Codec time (``compute.codec``). Encoding and decoding messages (quantizers, compressors) is
work on the critical path of the exchange it serves: the engine counts the elements coded
between two effects of a program (:mod:`relaxsgd.codec_meter`) and delays the next effect
(the send, the step) by ``encoded x encode_s + decoded x decode_s``, and delays a handler's
reply by the handler's own. The per-element costs come from the compute profile (a named
one's documented figures, or a calibrated file's, measured through the real codec by
``relaxsgd calibrate``), scaled by ``max(1, wpc)`` and each worker's heterogeneity factor
like a step. ``codec: auto`` (default) charges it unless ``step_time_s`` is a number: a
fixed step time states the compute in virtual seconds rather than a machine's, and the
default job's figures are measured that way (its codec time is not part of them); ``on``
charges it whatever the step time (a step time measured in a real run, with the profile
naming the machine), ``off`` never.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from ..checks import require_float
from ..errors import ConfigError
from ..requires import Needs, check_needs

KINDS = ("none", "fixed", "lognormal", "stragglers", "jitter", "calibrated")
CODEC = ("auto", "on", "off")
DEFAULT_PROFILE = "laptop-core"


@dataclass(frozen=True)
class ComputeProfile:
    """Sustained throughput a small model really gets on one device, and where from."""

    name: str
    flops_per_s: float
    overhead_s: float  # per local step: Python, kernel launches, elementwise, optimizer
    source: str
    encode_s: float = 1.0e-8  # per element encoded (a quantizer's encode, a compress)
    decode_s: float = 6.0e-9  # per element decoded


# One core of this project's machine (one torch thread), p2p_profile.py section 0: SwarmSGD's
# 8-bit lattice on the MNIST CNN (455k parameters, 8 tensors), encode with the sender's own
# copy 4.3 ms, decode 2.6 ms at load ~1 (9.5 and 5.7 ns an element). GPUs: not measured;
# ~20 float64 passes at a few hundred GB/s sustained, 2e-10 and 1e-10 s an element.
CPU_CODEC = {"encode_s": 1.0e-8, "decode_s": 6.0e-9}
GPU_CODEC = {"encode_s": 2.0e-10, "decode_s": 1.0e-10}


# Sustained numbers for small models (MLPs, small CNNs, batch 32-128) in eager PyTorch,
# fp32. CPU: one core, one torch thread (the simulator's and the dist runtime's default).
PROFILES: dict[str, ComputeProfile] = {p.name: p for p in [
    ComputeProfile("laptop-core", 20e9, 3e-4,
                   "one core of a recent laptop CPU (AVX2, ~3.5 GHz: 112 GFLOP/s fp32 "
                   "peak); ~20% of peak, the share the 'server-core' measurement gets",
                   **CPU_CODEC),
    ComputeProfile("server-core", 35e9, 2.5e-4,
                   "one core of the AMD EPYC VM this project is developed on, measured "
                   "with --step-time measure (batch 32, one thread): logreg 0.24 ms, "
                   "MNIST-1D MLP 0.55 ms (14.4 MFLOP), its CNN 2.2 ms (56 MFLOP)",
                   **CPU_CODEC),
    ComputeProfile("t4", 2.5e12, 1.0e-3,
                   "NVIDIA T4: 8.1 TFLOP/s fp32 peak (datasheet); ~30% sustained, ~1 ms "
                   "of launches per eager step (~100 kernels x ~10 us)", **GPU_CODEC),
    ComputeProfile("v100", 5e12, 6e-4,
                   "NVIDIA V100 SXM2: 15.7 TFLOP/s fp32 peak (datasheet); ~30% sustained",
                   **GPU_CODEC),
    ComputeProfile("a100", 20e12, 5e-4,
                   "NVIDIA A100: 19.5 TFLOP/s fp32, 156 TF32 peak (datasheet); TF32 "
                   "matmuls at ~13% of the TF32 peak for small layers", **GPU_CODEC),
    ComputeProfile("h100", 50e12, 4e-4,
                   "NVIDIA H100 SXM: 67 TFLOP/s fp32, 495 TF32 dense peak (datasheet); "
                   "~10% of TF32 peak for small layers", **GPU_CODEC),
]}


@dataclass(frozen=True)
class ComputeConfig:
    step_time_s: float | str | None = None  # None: from the profile; "measure"; seconds
    profile: str = DEFAULT_PROFILE  # a name in PROFILES or a calibrated profile file
    workers_per_core: float = 1.0
    heterogeneity: str = "none"
    speed_factors: tuple[float, ...] = field(default=())
    sigma: float = 0.5
    straggler_p: float = 0.05
    straggler_f: float = 5.0
    codec: str | bool = "auto"  # codec time: auto (unless the step time is fixed), on, off

    NEEDS = (Needs("speed_factors", lambda c: c.heterogeneity == "fixed",
                   "compute.heterogeneity=fixed"),
             Needs("sigma", lambda c: c.heterogeneity in ("lognormal", "jitter"),
                   "compute.heterogeneity=lognormal or jitter"),
             Needs("straggler_p", lambda c: c.heterogeneity == "stragglers",
                   "compute.heterogeneity=stragglers"),
             Needs("straggler_f", lambda c: c.heterogeneity == "stragglers",
                   "compute.heterogeneity=stragglers"))

    def __post_init__(self) -> None:
        st = self.step_time_s
        if isinstance(st, str):
            if st != "measure":
                raise ConfigError(f"compute.step_time_s must be a number of seconds > 0, "
                                  f"'measure' or null (the compute profile), got {st!r}")
        elif st is not None:
            require_float(st, "compute.step_time_s", above=0)
        require_float(self.workers_per_core, "compute.workers_per_core", above=0)
        if isinstance(self.codec, bool):  # YAML reads on/off as booleans
            object.__setattr__(self, "codec", "on" if self.codec else "off")
        if self.codec not in CODEC:
            raise ConfigError(f"compute.codec must be one of {', '.join(CODEC)} (codec time "
                              f"charged), got {self.codec!r}")
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
        check_needs(self, "compute.")

    @property
    def fixed_step_time(self) -> float | None:
        """The step time in seconds when the config sets one, else None."""
        st = self.step_time_s
        return float(st) if isinstance(st, (int, float)) else None

    @property
    def charges_codec(self) -> bool:
        """Whether codec time is charged (``codec``: auto = unless the step time is fixed)."""
        return self.codec == "on" or (self.codec == "auto" and self.fixed_step_time is None)


def load_profile(name: str) -> tuple[ComputeProfile, dict[str, Any]]:
    """A named profile, or the ``compute`` section of a calibrated profile file (with the
    file's own measured step time, returned in the second value)."""
    if name in PROFILES:
        return PROFILES[name], {}
    from .profile_file import read_section

    sec = read_section(name, "compute", what="compute profile",
                       choices=", ".join(PROFILES))
    try:
        prof = ComputeProfile(f"file:{name}", float(sec["flops_per_s"]),
                              float(sec.get("overhead_s", 0.0)),
                              str(sec.get("source", "calibrated")),
                              float(sec.get("encode_s", CPU_CODEC["encode_s"])),
                              float(sec.get("decode_s", CPU_CODEC["decode_s"])))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"compute profile file {name!r} needs compute.flops_per_s (a "
                          "number) as written by 'relaxsgd calibrate'") from None
    if not (prof.flops_per_s > 0 and prof.overhead_s >= 0 and prof.encode_s >= 0
            and prof.decode_s >= 0):
        raise ConfigError(f"compute profile file {name!r}: flops_per_s must be > 0, "
                          "overhead_s, encode_s and decode_s >= 0")
    return prof, sec


def profile_step_time(flops_per_sample: float, batch_size: int, prof: ComputeProfile,
                      workers_per_core: float = 1.0) -> float:
    """Seconds of one local step: ``(overhead + flops x batch / throughput) x max(1, wpc)``."""
    return ((prof.overhead_s + flops_per_sample * batch_size / prof.flops_per_s)
            * max(1.0, workers_per_core))


class ComputeModel:
    """Virtual durations: ``duration`` of local steps, ``codec_time`` of coded elements
    (``codec``: the profile's ``(encode_s, decode_s)`` per element, None: not charged)."""

    def __init__(self, cfg: ComputeConfig, n: int, seed: int, step_time_s: float,
                 codec: tuple[float, float] | None = None,
                 per_codec: dict[str, tuple[float, float]] | None = None) -> None:
        self.cfg = cfg
        self.step_time = step_time_s
        self.codec = codec
        self.per_codec = per_codec or {}  # a codec's own (encode_s, decode_s) per element
        self.rngs = [random.Random(seed * 1_000_033 + i) for i in range(n)]
        # the per-effect noise's sigma (jitter, calibrated), 0: none
        self.jitter = (cfg.sigma if cfg.heterogeneity == "jitter" else
                       calibrated_sigma(cfg.profile) if cfg.heterogeneity == "calibrated"
                       else 0.0)
        if cfg.heterogeneity == "fixed":
            f = cfg.speed_factors
            self.factors = [float(f[i % len(f)]) for i in range(n)]
        elif cfg.heterogeneity == "lognormal":
            self.factors = [math.exp(r.gauss(0.0, cfg.sigma)) for r in self.rngs]
        else:
            self.factors = [1.0] * n

    def duration(self, rank: int, steps: int) -> float:
        """Seconds of ``steps`` local steps of ``rank`` (one effect: one jitter draw)."""
        base = self.step_time * self.factors[rank]
        if self.jitter > 0:
            s = self.jitter
            return base * steps * math.exp(self.rngs[rank].gauss(-s * s / 2, s))
        if self.cfg.heterogeneity != "stragglers":
            return base * steps
        r, p, f = self.rngs[rank], self.cfg.straggler_p, self.cfg.straggler_f
        slow = sum(1 for _ in range(steps) if r.random() < p)
        return base * (steps + (f - 1) * slow)

    def work_time(self, rank: int | None, work: Any) -> float:
        """Seconds ``rank`` (None: the parameter server, speed factor 1) spends on a
        scope's codec work (:class:`relaxsgd.codec_meter.CodecWork`): each codec's
        elements at its own per-element costs (``per_codec``, from the profile's
        ``codecs``), the profile's ``encode_s``/``decode_s`` for a codec it does not
        list; times ``max(1, wpc)`` and the worker's speed factor; 0 when not charged."""
        if self.codec is None or not (work.encoded or work.decoded):
            return 0.0
        total = 0.0
        for name, (e, d) in work.by.items():
            enc, dec = self.per_codec.get(name, self.codec)
            total += e * enc + d * dec
        factor = self.factors[rank] if rank is not None else 1.0
        return total * factor * max(1.0, self.cfg.workers_per_core)

    def codec_time(self, rank: int, encoded: int, decoded: int) -> float:
        """Seconds ``rank`` spends coding that many elements (0 when not charged): the
        profile's per-element costs, times ``max(1, wpc)`` and the worker's speed factor
        (stragglers: the codec is not a step, no straggler draw)."""
        if self.codec is None or not (encoded or decoded):
            return 0.0
        enc, dec = self.codec
        return ((encoded * enc + decoded * dec) * self.factors[rank]
                * max(1.0, self.cfg.workers_per_core))


def codec_table(cfg: ComputeConfig) -> dict[str, tuple[float, float]]:
    """{codec: (encode_s, decode_s)} per element from a calibrated profile file's
    ``codecs`` mapping (``relaxsgd calibrate`` times each codec); {} when none (every
    codec is then charged the profile's ``encode_s``/``decode_s``) or not charged."""
    if not cfg.charges_codec or cfg.profile in PROFILES:
        return {}
    _, sec = load_profile(cfg.profile)
    table = sec.get("codecs") or {}
    out: dict[str, tuple[float, float]] = {}
    bad = ConfigError(f"compute profile file {cfg.profile!r}: compute.codecs must map codec "
                      "names to {encode_s: seconds >= 0, decode_s: seconds >= 0}, as "
                      "'relaxsgd calibrate' writes it")
    if not isinstance(table, dict):
        raise bad
    for name, c in table.items():
        try:
            e, d = float(c["encode_s"]), float(c["decode_s"])
        except (KeyError, TypeError, ValueError):
            raise bad from None
        if not (math.isfinite(e) and math.isfinite(d) and e >= 0 and d >= 0):
            raise bad
        out[str(name)] = (e, d)
    return out


def calibrated_sigma(profile: str) -> float:
    """The ``step_sigma`` of a calibrated compute profile file (``heterogeneity:
    calibrated``): the log-normal sigma of the per-rank step time within a synchronous
    round, as ``relaxsgd calibrate`` measured it."""
    if profile in PROFILES:
        raise ConfigError(f"compute.heterogeneity 'calibrated' needs a compute profile file "
                          f"written by 'relaxsgd calibrate', not the named profile "
                          f"{profile!r}; or use 'jitter' with compute.sigma")
    _, sec = load_profile(profile)
    sigma = sec.get("step_sigma")
    if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not (
            0 <= sigma < 10):
        raise ConfigError(f"compute profile file {profile!r} has no step_sigma (a number in "
                          "[0, 10)); write it again with 'relaxsgd calibrate', or use "
                          "compute.heterogeneity 'jitter' with compute.sigma")
    return float(sigma)


def expected_max_lognormal(n: int, sigma: float) -> float:
    """E[max of n iid exp(N(-sigma^2/2, sigma^2))] (each of mean 1): how much longer than
    the mean step a synchronous round of n jittered workers computes. Numerically,
    ``E[max] = integral_0^inf 1 - F(x)^n dx`` in log space (x = e^u), Simpson's rule
    over +-10 sigma."""
    if n <= 1 or sigma <= 0:
        return 1.0
    mu, k = -sigma * sigma / 2, 4000
    lo, hi = mu - 10 * sigma, mu + 10 * sigma
    h = (hi - lo) / k

    def f(u: float) -> float:
        cdf = 0.5 * (1 + math.erf((u - mu) / (sigma * math.sqrt(2))))
        return (1 - cdf ** n) * math.exp(u)

    total = f(lo) + f(hi) + sum((4 if i % 2 else 2) * f(lo + i * h) for i in range(1, k))
    return total * h / 3 + math.exp(lo)  # (the integral below e^lo: 1 - F^n ~ 1 there)


def codec_costs(cfg: ComputeConfig) -> tuple[float, float] | None:
    """``(encode_s, decode_s)`` per element from ``cfg``'s profile, or None when
    ``cfg`` does not charge codec time."""
    if not cfg.charges_codec:
        return None
    prof, _ = load_profile(cfg.profile)
    return prof.encode_s, prof.decode_s


def count_flops(spec: Any, batch_size: int) -> float:
    """Forward + backward FLOPs per sample of ``spec``'s model on one training batch
    (``torch.utils.flop_counter``: matrix products and convolutions, exact for them)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = spec.model_fn()
    x, y = spec.data.x_train[:batch_size], spec.data.y_train[:batch_size]
    with FlopCounterMode(display=False) as counter:
        spec.loss_fn(model(x), y).backward()
    return counter.get_total_flops() / max(int(x.shape[0]), 1)


def resolve_step_time(cfg: ComputeConfig, spec: Any, batch_size: int,
                      measure: Any) -> tuple[float, dict[str, Any]]:
    """The reference step time of a run and what it came from (``result.json``'s
    ``compute_model``). ``measure()`` times this machine, called only when asked for."""
    info: dict[str, Any] = {"workers_per_core": cfg.workers_per_core,
                            "heterogeneity": cfg.heterogeneity}
    if cfg.heterogeneity in ("jitter", "calibrated"):  # the sigma each effect is drawn with
        info["sigma"] = (cfg.sigma if cfg.heterogeneity == "jitter"
                         else calibrated_sigma(cfg.profile))
    if cfg.fixed_step_time is not None:
        return cfg.fixed_step_time, {"kind": "fixed", "step_time_s": cfg.fixed_step_time,
                                     **info}
    if cfg.step_time_s == "measure":
        st = float(measure()) * max(1.0, cfg.workers_per_core)
        return st, {"kind": "measured", "step_time_s": st, **info}
    prof, sec = load_profile(cfg.profile)
    fps = count_flops(spec, batch_size)
    st = profile_step_time(fps, batch_size, prof, cfg.workers_per_core)
    measured = sec.get("step_time_s")
    # a calibrated file's own measurement wins for the very model and batch it timed
    if isinstance(measured, (int, float)) and measured > 0 and math.isclose(
            float(sec.get("flops_per_step", -1)), fps * batch_size, rel_tol=1e-6):
        st = float(measured)  # timed with the real run's own core sharing
    return st, {"kind": "profile", "profile": prof.name, "flops_per_s": prof.flops_per_s,
                "overhead_s": prof.overhead_s, "flops_per_sample": fps,
                "batch_size": batch_size, "step_time_s": st, "source": prof.source, **info}
