"""The deterministic compute model: FLOPs x batch / profile throughput, its sources, and
that a run without --step-time is the same on any machine whatever its load."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relaxsgd.cli import main
from relaxsgd.run import prepare, simulate
from relaxsgd.sim.compute import (
    PROFILES,
    ComputeConfig,
    count_flops,
    profile_step_time,
    resolve_step_time,
)
from simkit import tiny

D, C, B = 8, 4, 8  # simkit's logreg: dim 8, 4 classes, batch 8


def test_logreg_flops_are_counted_as_by_hand() -> None:
    """Logistic regression, x (B x d) @ W (d x c): forward 2dc per sample, backward only
    the weight gradient (the input needs none) 2dc: 4dc."""
    prep = prepare(tiny(steps=1, task_options={"dim": D, "classes": C}))
    assert count_flops(prep.spec, B) == 4 * D * C
    prep = prepare(tiny(steps=1, task_options={"dim": 2 * D, "classes": C}))
    assert count_flops(prep.spec, B) == 4 * 2 * D * C


def test_profile_step_time_is_overhead_plus_flops_times_batch_over_throughput() -> None:
    prof = PROFILES["laptop-core"]
    want = prof.overhead_s + 4 * D * C * B / prof.flops_per_s
    assert profile_step_time(4 * D * C, B, prof) == pytest.approx(want, rel=1e-12)
    assert profile_step_time(4 * D * C, B, prof, workers_per_core=2) == pytest.approx(2 * want)
    assert profile_step_time(4 * D * C, B, prof, workers_per_core=0.5) == pytest.approx(want)
    a100 = PROFILES["a100"]
    assert profile_step_time(1e9, 64, a100) == pytest.approx(a100.overhead_s + 64e9 / 20e12)
    assert all(p.source for p in PROFILES.values())


def test_a_run_records_its_compute_and_network_model() -> None:
    cfg = tiny(algo="localsgd", compute={"step_time_s": None, "profile": "t4"},
               network="wan")
    res = simulate(prepare(cfg)).result
    cm, nm = res["compute_model"], res["network_model"]
    assert cm["kind"] == "profile" and cm["profile"] == "t4"
    assert cm["codec"] == {"encode_s": 2e-10, "decode_s": 1e-10}  # the t4 profile's
    assert cm["flops_per_sample"] == 4 * D * C and cm["batch_size"] == B
    assert res["step_time_s"] == pytest.approx(1e-3 + 4 * D * C * B / 2.5e12)
    assert nm["profile"] == "wan" and nm["backend"] == "gloo" and nm["latency_s"] == 0.04
    assert nm["collectives"]["allreduce_latency_s"] == pytest.approx(4 * 3 * 0.04)
    fixed = simulate(prepare(tiny(algo="localsgd"))).result["compute_model"]
    assert fixed == {"kind": "fixed", "step_time_s": 0.01, "workers_per_core": 1.0,
                     "heterogeneity": "none", "codec": "off"}  # a fixed step: no codec


def test_measure_is_an_explicit_choice_and_a_calibrated_file_is_used(tmp_path: Path) -> None:
    prep = prepare(tiny(steps=1))
    calls = []

    def measure() -> float:
        calls.append(1)
        return 0.123

    st, info = resolve_step_time(ComputeConfig(), prep.spec, B, measure)
    assert not calls and info["kind"] == "profile" and info["profile"] == "laptop-core"
    st, info = resolve_step_time(ComputeConfig(step_time_s="measure", workers_per_core=2),
                                 prep.spec, B, measure)
    assert calls and st == pytest.approx(0.246) and info["kind"] == "measured"
    f = tmp_path / "cal.yaml"
    f.write_text(f"compute: {{flops_per_s: 1.0e9, overhead_s: 0.0, step_time_s: 0.5, "
                 f"flops_per_step: {4 * D * C * B}}}\n")
    st, info = resolve_step_time(ComputeConfig(profile=str(f)), prep.spec, B, measure)
    assert st == 0.5  # the file's own measurement, for the very model it timed
    st, _ = resolve_step_time(ComputeConfig(profile=str(f)), prep.spec, 2 * B, measure)
    assert st == pytest.approx(4 * D * C * 2 * B / 1e9)  # another batch: its throughput


@pytest.mark.parametrize("args,msg", [
    (["--step-time", "fast"], "compute.step_time_s must be a number of seconds > 0, "
                              "'measure' or null"),
    (["--step-time", "-1"], "compute.step_time_s must be a finite number > 0"),
    (["--compute", "tpu"], "unknown compute profile 'tpu'; choose one of: laptop-core"),
    (["--compute", "nofile.yaml"], "compute profile file 'nofile.yaml' not found"),
    (["--set", "compute.workers_per_core=0"],
     "compute.workers_per_core must be a finite number > 0"),
    (["--network", "nofile.yaml"], "network profile file 'nofile.yaml' not found"),
])
def test_bad_compute_flags_are_one_line_and_exit_2(args: list[str], msg: str, tmp_path: Path,
                                                   capsys: Any) -> None:
    code = main(["run", "--task", "logreg", "--steps", "2", "-q", "--out",
                 str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("relaxsgd: error: ") and msg in err and err.count("\n") == 1


def test_a_profile_file_without_throughput_is_one_line(tmp_path: Path, capsys: Any) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("compute: {overhead_s: 0.001}\n")
    code = main(["run", "--task", "logreg", "--steps", "2", "-q", "--compute", str(f),
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "needs compute.flops_per_s" in err and err.count("\n") == 1


# -- reproducibility -----------------------------------------------------------------------

WALL = {"wall_time_s", "eval_wall_time_s", "eval_wall_share"}


def _run(out: Path, algo: str) -> tuple[list[dict], dict]:
    assert main(["run", "--task", "logreg", "--workers", "4", "--algo", algo, "--steps", "30",
                 "--evals", "3", "--network", "wan", "--seed", "3", "-q",
                 # the default job fixes 50 ms a step; naming the profile derives it from
                 # the model's FLOPs, the path this test is about
                 "--compute", "laptop-core", "--out", str(out)]) == 0
    with open(out / "metrics.csv", encoding="utf-8") as f:
        rows = [{k: v for k, v in r.items() if k not in WALL} for r in csv.DictReader(f)]
    res = json.loads((out / "result.json").read_text())
    res["final"] = {k: v for k, v in res["final"].items() if k not in WALL}
    return rows, res


@pytest.mark.parametrize("algo", ["localsgd", "swarm"])
def test_without_step_time_a_run_is_identical_even_under_cpu_load(algo: str,
                                                                   tmp_path: Path) -> None:
    rows1, res1 = _run(tmp_path / "a", algo)
    burn = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        rows2, res2 = _run(tmp_path / "b", algo)
    finally:
        for p in burn:
            p.kill()
            p.wait()
    assert res1["compute_model"]["kind"] == "profile"
    assert rows1 == rows2
    assert res1 == res2
