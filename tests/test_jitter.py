"""What a synchronous round waits for: the slowest worker's compute, under each step-time
distribution (fixed factors, per-effect log-normal jitter), pinned by hand-computed cases;
E[max of n] of the jitter; the jitter fitted from per-rank round times (``relaxsgd
calibrate``) and read back from a profile file."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from relaxsgd.errors import ConfigError
from relaxsgd.lab.fit import fit_jitter
from relaxsgd.run import prepare, simulate
from relaxsgd.sim.compute import ComputeConfig, ComputeModel, expected_max_lognormal
from simkit import tiny

STEP, N, D, STEPS = 0.01, 4, 36, 12  # tiny(): step time, workers, logreg parameters, steps
PER_STEP = 2 * (N - 1) / N * 4 * D  # bytes one worker sends in one all-reduce
REDUCE_S = 4 * (N - 1) * 250e-6 + PER_STEP / (2e9 / 8)  # gloo's all-reduce on "cloud"


def test_a_synchronous_round_waits_for_its_slowest_worker() -> None:
    """All-reduce SGD with speed factors 1, 1, 3, 1: each round computes 3 x STEP (the
    slow worker's), then the all-reduce; the fast workers stall 2 x STEP + the reduce."""
    f = simulate(prepare(tiny(algo="allreduce", network="cloud", compute={
        "heterogeneity": "fixed", "speed_factors": [1, 1, 3, 1]}))).result["final"]
    assert f["virtual_time_s"] == pytest.approx(STEPS * (3 * STEP + REDUCE_S), rel=1e-12)
    stall = STEPS * (3 * (2 * STEP + REDUCE_S) + REDUCE_S) / N
    assert f["stall_time_s_mean"] == pytest.approx(stall, rel=1e-9)


def test_under_jitter_each_round_takes_the_max_of_the_workers_draws() -> None:
    """Jitter: each Grad of worker i takes STEP x exp(g), g ~ N(-s^2/2, s^2) drawn in turn
    from the worker's own stream random.Random(seed x 1000033 + i): the run's time is the
    sum over rounds of the largest of the four draws, plus the reduces."""
    s, cfg = 0.3, tiny(algo="allreduce", network="cloud",
                       compute={"heterogeneity": "jitter", "sigma": 0.3})
    rngs = [random.Random(cfg.seed * 1_000_033 + i) for i in range(N)]
    draws = [[math.exp(r.gauss(-s * s / 2, s)) for _ in range(STEPS)] for r in rngs]
    want = sum(STEP * max(d[k] for d in draws) for k in range(STEPS)) + STEPS * REDUCE_S
    f = simulate(prepare(cfg)).result["final"]
    assert f["virtual_time_s"] == pytest.approx(want, rel=1e-12)
    assert want > STEPS * (STEP + REDUCE_S) * 1.05  # (the max of four: well above the mean)


def test_jitter_draws_have_mean_one_and_log_sigma() -> None:
    m = ComputeModel(ComputeConfig(heterogeneity="jitter", sigma=0.4), 2, seed=5,
                     step_time_s=1.0)
    xs = [m.duration(1, 1) for _ in range(20000)]
    logs = [math.log(x) for x in xs]
    assert sum(xs) / len(xs) == pytest.approx(1.0, abs=0.01)  # mean one: the mean step
    assert sum(logs) / len(logs) == pytest.approx(-0.08, abs=0.01)  # -sigma^2 / 2
    assert min(xs) > 0
    # one draw per effect: 5 steps in one effect scale together
    a = ComputeModel(m.cfg, 2, seed=9, step_time_s=0.01)
    b = ComputeModel(m.cfg, 2, seed=9, step_time_s=0.01)
    assert a.duration(0, 5) == pytest.approx(5 * b.duration(0, 1))
    assert ComputeModel(ComputeConfig(heterogeneity="jitter", sigma=0.0), 1, 1,
                        0.01).duration(0, 3) == pytest.approx(0.03)


def test_expected_max_of_lognormal_draws() -> None:
    """E[max(X1, X2)] for lognormal of mean one is 2 Phi(sigma / sqrt 2): sigma 0.3:
    2 x Phi(0.21213) = 1.16800; one worker or no spread: 1; n = 4 by Monte Carlo."""
    assert expected_max_lognormal(2, 0.3) == pytest.approx(1.16800, abs=2e-5)
    assert expected_max_lognormal(1, 0.3) == 1.0 and expected_max_lognormal(4, 0.0) == 1.0
    r, s = random.Random(1), 0.25
    mc = sum(max(math.exp(r.gauss(-s * s / 2, s)) for _ in range(4))
             for _ in range(40000)) / 40000
    assert expected_max_lognormal(4, s) == pytest.approx(mc, rel=0.01)
    assert expected_max_lognormal(8, s) > expected_max_lognormal(4, s) > 1.15


def test_fit_jitter_on_a_hand_computed_case_and_recovers_a_known_sigma() -> None:
    """One round [1, 3]: slowest / mean 1.5 = E[max of 2] = 2 Phi(sigma / sqrt 2), so
    Phi(sigma / sqrt 2) = 0.75, sigma = sqrt 2 x 0.674490 = 0.953873; the mean step 2; a
    round's common slowdown (every rank x 3) is no spread."""
    sigma, mean = fit_jitter([[1.0, 3.0]])
    assert sigma == pytest.approx(0.953873, abs=1e-5) and mean == pytest.approx(2.0)
    assert fit_jitter([[1.0, 1.0], [3.0, 3.0]])[0] == 0.0
    # rounds weigh by their length, as in a run's time: [1, 3] and [10, 10] take
    # 3 + 10 = 13 against means 2 + 10 = 12; 2 Phi(sigma / sqrt 2) = 13/12, so
    # sigma = sqrt 2 x Phi^-1(13/24) = sqrt 2 x 0.1046335 = 0.147974
    assert fit_jitter([[1.0, 3.0], [10.0, 10.0]])[0] == pytest.approx(0.147974, abs=1e-5)
    r = random.Random(3)
    rounds = [[0.02 * (1 + k % 3) * math.exp(r.gauss(0, 0.25)) for _ in range(4)]
              for k in range(4000)]
    assert fit_jitter(rounds)[0] == pytest.approx(0.25, rel=0.04)


def test_calibrated_heterogeneity_reads_the_profiles_step_sigma(tmp_path: Path) -> None:
    f = tmp_path / "cal.yaml"
    f.write_text("compute: {flops_per_s: 1.0e9, step_sigma: 0.3}\n")
    cfg = ComputeConfig(heterogeneity="calibrated", profile=str(f))
    assert ComputeModel(cfg, 2, 1, 0.01).jitter == 0.3
    g = tmp_path / "old.yaml"
    g.write_text("compute: {flops_per_s: 1.0e9}\n")
    with pytest.raises(ConfigError, match="no step_sigma"):
        ComputeModel(ComputeConfig(heterogeneity="calibrated", profile=str(g)), 2, 1, 0.01)
    with pytest.raises(ConfigError, match="profile file"):
        ComputeModel(ComputeConfig(heterogeneity="calibrated"), 2, 1, 0.01)
