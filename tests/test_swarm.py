"""SwarmSGD: exact invariants of its averaging, its schedules, its quantized messages."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from gossipkit import cd, conf, gossip_run
from relaxsgd.algorithms.swarm import SwarmConfig, SwarmSGD
from relaxsgd.cli import main
from relaxsgd.errors import ConfigError
from relaxsgd.run import prepare, simulate
from simkit import tiny

SUM_CASES = [
    {},
    {"steps_dist": "fixed"},
    {"averaging": "blocking"},
    {"schedule": "sequential"},
    {"schedule": "sequential", "averaging": "blocking", "steps_dist": "geometric"},
    {"overlap": True},
    {"quantizer": "lattice"},
    {"quantizer": "lattice", "per_tensor": False, "bits": 4},
    {"quantizer": "lattice", "schedule": "sequential", "averaging": "blocking"},
    {"quantizer": "qsgd", "bits": 4},
    {"quantizer": "qsgd", "schedule": "sequential"},
    {"quantizer": "lattice", "eps": 1e-5, "bits": 4},  # mostly decode failures
]


def _sum_error(r) -> float:
    return float((r.X.double().sum(0) - r.X0.double().sum(0)).abs().max())


@pytest.mark.parametrize("opts", SUM_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in
                                                                 o.items()) or "default")
def test_symmetric_averaging_preserves_the_sum_of_the_models(opts) -> None:
    r = gossip_run("swarm", {"H": 2, **opts}, workers=6, steps=24, topology="ring")
    assert _sum_error(r) < 1e-5  # float32 rounding only
    assert cd(r.X) < 0.2 * cd(r.X0)  # and they did average
    assert r.metrics["interactions_per_worker"] >= 12  # both sides count, 1/n each
    assert all(w.step == 24 for w in r.workers)


def test_the_textbook_update_keeps_the_sum_only_in_expectation() -> None:
    """exact_mean=False (x_i <- (Q(c_i) + Q(c_j)) / 2 - S_i) moves the sum by the rounding
    noise, so the invariant above is a real check of the exact_mean form."""
    opts = {"H": 2, "quantizer": "lattice", "bits": 4, "exact_mean": False}
    r = gossip_run("swarm", opts, workers=6, steps=24)
    assert _sum_error(r) > 1e-4


def test_pull_updates_only_the_initiator_and_still_contracts() -> None:
    r = gossip_run("swarm", {"H": 1, "update": "pull"}, workers=6, steps=30)
    assert _sum_error(r) > 1e-3  # one-sided: the sum is not kept
    assert cd(r.X) < 0.2 * cd(r.X0)


def test_sequential_schedule_equals_the_serial_random_edge_model() -> None:
    """Concurrent execution of the shared edge stream = the serial model, exactly."""
    for averaging in ("blocking", "nonblocking"):
        opts = {"schedule": "sequential", "H": 2, "averaging": averaging,
                "steps_dist": "fixed"}
        r = gossip_run("swarm", opts, workers=7, steps=16, topology="random-regular",
                       topology_options={"degree": 4})
        edges: dict[int, tuple[int, int]] = {}
        for i in range(7):
            for t, j, _, init in r.algo.plan(i, 16):
                if init:
                    edges[t] = (i, j)
        ref = r.X0.clone()
        for t in sorted(edges):
            i, j = edges[t]
            avg = (ref[i] + ref[j]) / 2
            ref[i], ref[j] = avg, avg.clone()
        torch.testing.assert_close(r.X, ref, rtol=0, atol=1e-6)
        assert len(edges) == max(t for t in edges) + 1  # every edge of the stream ran


def test_sequential_plan_gives_every_worker_its_exact_budget() -> None:
    cfg = SwarmConfig(schedule="sequential", H=3, steps_dist="geometric")
    prep = prepare(tiny(algo="swarm", workers=8, topology="hypercube",
                        algo_options=vars(cfg)))
    algo: SwarmSGD = prep.algo
    hs = []
    for i in range(8):
        plan = algo.plan(i, 200)
        assert sum(h for _, _, h, _ in plan) == 200
        assert [t for t, *_ in plan] == sorted(t for t, *_ in plan)
        hs += [h for _, _, h, _ in plan if h]
    # geometric with mean 3 (the capped last interaction of each worker aside)
    assert abs(sum(hs) / len(hs) - 3.0) < 0.35


def test_lattice_bytes_counted_are_the_encoded_sizes() -> None:
    """Per interaction: request + reply (codes of bits/8 bytes a coordinate, 4 bytes of
    checksum and 4 of eps per parameter tensor) + an 8-byte commit, acknowledged in 0."""
    for bits in (8, 6, 5):
        opts = {"H": 2, "steps_dist": "fixed", "quantizer": "lattice", "bits": bits,
                "eps": 0.6 / (2 ** (bits - 1) - 1)}  # range +-0.6: no decode failure
        r = gossip_run("swarm", opts, workers=4, steps=12, scale=0.05)
        assert r.metrics.get("decode_failures", 0) == 0
        sizes = [s.numel() for _, s in r.bank.layout]
        message = sum(math.ceil(k * bits / 8) + 8 for k in sizes)
        requests = 4 * 12 // 2
        total = sum(p.bytes_sent for p in r.engine.procs)
        assert total == requests * (2 * message + 8)


def test_qsgd_bytes_counted_are_the_encoded_sizes() -> None:
    """The first message of each direction of a pair is full precision (it sets the shared
    reference); every later one is codes + scales + a 4-byte version number."""
    r = gossip_run("swarm", {"H": 3, "quantizer": "qsgd", "bits": 5, "bucket_size": 16,
                             "schedule": "sequential", "steps_dist": "fixed"},
                   workers=4, steps=24, topology="ring")
    d = r.bank.d
    message = math.ceil(d * 5 / 8) + 4 * math.ceil(d / 16) + 4  # codes, scales, version
    assert r.metrics.get("decode_failures", 0) == 0
    sent = 2 * sum(len(r.algo.plan(i, 24)) for i in range(4))  # copy and ok-flag, a side
    pairs = {(i, j) for i in range(4) for _, j, _, _ in r.algo.plan(i, 24)}
    copies = sent // 2
    expected = (copies - len(pairs)) * message + len(pairs) * (4 * d + 4) + copies * 1
    assert sum(p.bytes_sent for p in r.engine.procs) == expected
    assert _sum_error(r) < 1e-5


def test_decode_failures_are_counted_and_answered_in_full_precision() -> None:
    opts = {"H": 1, "quantizer": "lattice", "bits": 4, "eps": 1e-4}
    r = gossip_run("swarm", opts, workers=4, steps=10, scale=1.0)
    fails = r.metrics["decode_failures"]
    assert fails > 0
    full = 4 * r.bank.d
    assert r.metrics["fallback_bytes"] >= fails * full
    assert _sum_error(r) < 1e-5  # the fallback is exact, so the sum still holds
    assert cd(r.X) < 0.05 * cd(r.X0)


def test_adaptive_eps_follows_the_spread_with_few_failures() -> None:
    out = simulate(prepare(conf(algo="swarm", task="mnist1d", workers=6, steps=60,
                                task_options={"num_samples": 600, "model": "logreg"},
                                topology="ring", algo_options={"quantizer": "lattice",
                                                               "bits": 8})))
    f = out.result["final"]
    interactions = f["interactions_per_worker"] * 6 / 2
    assert f.get("decode_failures", 0) <= 0.05 * interactions
    assert 0 < f["lattice_eps_mean"] < 1e-2
    assert f["bytes_per_worker_per_step"] < 0.35 * 4 * out.bank.d  # ~1/4 of float32


def test_swarm_h1_blocking_complete_graph_converges_to_the_optimum() -> None:
    cfg = conf(algo="swarm", task="quadratic", workers=6, steps=600, topology="complete",
               task_options={"n_train": 600, "n_test": 100, "dim": 10, "noise": 0.1},
               algo_options={"H": 1, "averaging": "blocking"},
               train={"lr": 0.1, "batch_size": 16, "schedule": "cosine"})
    out = simulate(prepare(cfg))
    opt = prepare(cfg).spec.optimum  # the exact least-squares minimiser of the training loss
    # ||x - opt||^2 ~ 2e-9 here; without averaging (H = 600) the mean model ends 8.5e-6
    # away and single workers up to 8e-4 (each fits its own shard), so this is a real check
    assert float(((out.bank.X.mean(0) - opt) ** 2).sum()) < 1e-7
    for r in range(6):
        assert float(((out.bank.X[r] - opt) ** 2).sum()) < 1e-7
    assert out.rows[-1]["consensus_distance"] < 1e-10


def test_staleness_is_zero_blocking_and_about_h_nonblocking() -> None:
    base = {"H": 3, "schedule": "sequential", "steps_dist": "fixed"}
    r = gossip_run("swarm", {**base, "averaging": "blocking"}, steps=30)
    assert r.metrics["staleness_mean"] == 0
    r = gossip_run("swarm", base, steps=30)
    assert 2.5 <= r.metrics["staleness_mean"] <= 3.0  # the partner's steps since publish
    r = gossip_run("swarm", {"H": 3, "steps_dist": "fixed"}, steps=30)  # async: the
    # partner's block counts as done, so at most H
    assert 0 < r.metrics["staleness_mean"] <= 3.0


def test_runs_are_deterministic() -> None:
    cfg = tiny(algo="swarm", topology="ring", split="dirichlet",
               algo_options={"quantizer": "lattice", "overlap": True, "steps_dist": "geometric"})
    a, b = simulate(prepare(cfg)), simulate(prepare(cfg))
    assert torch.equal(a.bank.X, b.bank.X)
    assert a.result["final"]["virtual_time_s"] == b.result["final"]["virtual_time_s"]


@pytest.mark.parametrize("opts,match", [
    ({"schedule": "gossip"}, "schedule"),
    ({"H": 0}, "H"),
    ({"bits": 20, "quantizer": "qsgd"}, "bits"),
    ({"overlap": True, "averaging": "blocking"}, "overlap"),
    ({"eps": -1.0}, "eps"),
])
def test_bad_options_are_one_line_config_errors(opts, match) -> None:
    with pytest.raises(ConfigError, match=match):
        prepare(tiny(algo="swarm", algo_options=opts))


def test_cli_run_writes_the_family_metrics(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["run", "--algo", "swarm", "--task", "logreg", "--workers", "4", "--steps",
                 "16", "--topology", "ring", "--step-time", "0.01", "--evals", "4", "-q",
                 "--set", "quantizer=lattice", "--set", "H=2", "--set", "task.n_train=256",
                 "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader((out / "metrics.csv").read_text().splitlines()))
    for col in ("consensus_distance", "bytes_per_worker_per_step", "interactions_per_worker",
                "decode_failures", "staleness_mean", "lattice_eps_mean"):
        assert col in rows[0]
    assert float(rows[-1]["interactions_per_worker"]) > 0
    final = json.loads((out / "result.json").read_text())["final"]
    for key in ("consensus_distance", "bytes_per_worker_per_step", "interactions_per_worker",
                "staleness_mean"):
        assert final[key] is not None
    assert final["bytes_per_worker_per_step"] == pytest.approx(
        float(rows[-1]["bytes_per_worker_per_step"]))
