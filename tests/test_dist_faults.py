"""Faults and shutdown of the distributed runtime (gloo, 3 local processes).

A killed worker makes a synchronous run fail on every other worker at once with a line
naming it; a hung one after RELAXSGD_TIMEOUT; SIGTERM (what torchrun sends) or Ctrl-C
stops every worker within seconds with the outputs written so far; nothing hangs and no
process is left behind (``run_job`` kills whatever is left when it returns).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import pytest
import torch

from distkit import run_job, wait_for_rows
from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate

pytestmark = pytest.mark.dist

LONG: dict[str, Any] = {
    "algo": "allreduce",
    "task": "logreg", "task_options": {"n_train": 480, "n_test": 200, "dim": 8, "classes": 4},
    "steps": 100000, "evals": 2000, "compute": {"step_time_s": 0.002},
    "train": {"batch_size": 8, "lr": 0.05},
}


def _stamp(after: dict[str, float], job: Any, ranks: list[int], limit: float = 60) -> None:
    """Record when the given ranks have all exited (seconds after ``after['t']``)."""
    while any(job.procs[r].poll() is None for r in ranks):
        if time.monotonic() - after["t"] > limit:
            return
        time.sleep(0.02)
    after["dt"] = time.monotonic() - after["t"]


@pytest.mark.timeout(90)
def test_a_killed_worker_fails_a_synchronous_run_at_once_naming_it(tmp_path) -> None:
    out = str(tmp_path)
    t: dict[str, float] = {}

    def after(job: Any) -> None:
        assert wait_for_rows(out, 3)
        t["t"] = time.monotonic()
        job.signal(signal.SIGKILL, [2])
        _stamp(t, job, [0, 1])

    r = run_job(LONG, 3, out, timeout=60, after=after, env={"RELAXSGD_TIMEOUT": "30"})
    assert r.codes[2] == -signal.SIGKILL
    assert r.codes[:2] == [5, 5], r.logs
    for rank in (0, 1):
        assert "lost worker(s) [2]" in r.logs[rank], r.logs[rank]
        assert "connection closed without a goodbye" in r.logs[rank]
    assert t["dt"] < 10  # detected at once, not after RELAXSGD_TIMEOUT=30
    assert r.result is not None and r.result["status"] == "failed"
    assert "lost worker(s) [2]" in r.result["message"]
    assert len(r.metrics()) >= 3  # what was measured before is kept


@pytest.mark.timeout(90)
def test_a_hung_worker_fails_a_synchronous_run_after_the_timeout(tmp_path) -> None:
    out = str(tmp_path)
    t: dict[str, float] = {}

    def after(job: Any) -> None:
        assert wait_for_rows(out, 3)
        t["t"] = time.monotonic()
        job.signal(signal.SIGSTOP, [2])  # alive, sockets open, never answers
        _stamp(t, job, [0, 1])
        job.signal(signal.SIGKILL, [2])

    r = run_job(LONG, 3, out, timeout=60, after=after, env={"RELAXSGD_TIMEOUT": "3"})
    assert r.codes[:2] == [5, 5], r.logs
    for rank in (0, 1):
        assert "worker(s) [2] do not answer" in r.logs[rank], r.logs[rank]
        assert "RELAXSGD_TIMEOUT" in r.logs[rank]
    assert 3 <= t["dt"] < 12


@pytest.mark.timeout(90)
def test_sigterm_stops_every_worker_within_seconds_keeping_the_outputs(tmp_path) -> None:
    out = str(tmp_path)
    t: dict[str, float] = {}

    def after(job: Any) -> None:
        assert wait_for_rows(out, 3)
        t["t"] = time.monotonic()
        job.signal(signal.SIGTERM)  # what torchrun's agent sends on Ctrl-C or a failure
        _stamp(t, job, [0, 1, 2])

    cfg = {**LONG, "algo": "localsgd", "algo_options": {"p": 4}}
    r = run_job(cfg, 3, out, timeout=60, after=after)
    # Local SGD follows the checkpoint rule: every worker goes on to one common safe
    # point, saves its part and ends with SIGTERM's status (test_dist_checkpoint resumes)
    assert r.codes == [143, 143, 143], r.logs
    assert t["dt"] < 5
    assert r.result is not None and r.result["status"] == "interrupted"
    rows = r.metrics()
    assert len(rows) >= 3 and float(rows[-1]["step"]) > 0
    assert all(f"continue with 'relaxsgd resume {out}'" in lg for lg in r.logs)
    assert len([f for f in os.listdir(out) if f.startswith("checkpoint-rank")]) == 3


@pytest.mark.timeout(120)
def test_torchrun_runs_relaxsgd_run_and_matches_the_simulator(tmp_path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    cfg = {**LONG, "algo": "localsgd", "algo_options": {"p": 3}, "steps": 12, "evals": 2,
           "workers": 2}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RELAXSGD_SAVE_MODELS": "1",
           "RELAXSGD_SECRET": "torchrun-test-secret-0123456789"}  # torchrun makes none
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "--no-python",
                        "relaxsgd", "run", "--config", str(path), "--runtime", "dist",
                        "--out", str(out), "-q"], env=env, capture_output=True, text=True,
                       timeout=100)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"outputs in {out}" in p.stdout
    res = json.loads((out / "result.json").read_text())
    assert res["runtime"] == "dist" and res["status"] == "completed"
    assert (out / "metrics.csv").exists() and (out / "config.yaml").exists()
    sim = simulate(prepare(from_dict(cfg)))
    torch.testing.assert_close(torch.load(out / "models.pt")["X"], sim.bank.X,
                               rtol=1e-5, atol=2e-6)


@pytest.mark.timeout(60)
def test_sigterm_stops_a_worker_blocked_in_a_rendezvous_that_never_completes(tmp_path) -> None:
    from relaxsgd.distributed.launch import free_port

    cfg = tmp_path / "job.yaml"
    cfg.write_text(json.dumps({**LONG, "workers": 3}))
    port = free_port()
    procs = []
    for r in range(2):  # 2 of the job's 3 workers: the rendezvous waits for the third
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": "3", "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "RELAXSGD_SECRET": "rendezvous-test-secret-0123456789"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "relaxsgd.cli", "run", "--config", str(cfg), "--runtime",
             "dist", "--out", str(tmp_path / "out"), "-q"], env=env,
            stderr=subprocess.PIPE, text=True, start_new_session=True))
    try:
        time.sleep(6)  # started, and blocked in the rendezvous
        t = time.monotonic()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=20) for p in procs]
        dt = time.monotonic() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [130, 130]
    assert dt < 8  # the watchdog: 5 s after the signal at the latest
    assert all("interrupted" in p.stderr.read() for p in procs)
