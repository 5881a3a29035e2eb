"""A brand-new worker id joins a running elastic dist job and trains (issue 20).

A job of 2 workers with ``elastic.max_workers: 3`` runs under the launcher (which hosts
the store); ``python -m distkit join`` (``relaxsgd join`` with the test hooks) claims id 2,
takes the live state from its donor (worker 0, the lowest live id: a new id has no place
among the start graph's donors, as in the simulator) and trains on shard 2 of 3. The
workers of the job wait at their first safe point past step 6 until it is live (distkit's
hold hook), so the join happens mid-run."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from distkit import _collect, _job_env
from relaxsgd.config import from_dict
from relaxsgd.distributed.launch import LocalJob
from relaxsgd.run import prepare, simulate
from test_dist_parity import BASE

pytestmark = pytest.mark.dist

STEPS = 24


def _write(tmp_path: Any, cfg: dict[str, Any]) -> str:
    import yaml

    path = str(tmp_path / "job.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return path


def _join_run(tmp_path: Any, cfg: dict[str, Any], env: dict[str, str]) -> Any:
    """Launch the 2-worker job, join a third worker by hand; the collected outputs."""
    out, path = str(tmp_path / "out"), _write(tmp_path, cfg)
    flags = ["--config", path, "--runtime", "dist", "--out", out, "-q"]
    cmd = [sys.executable, "-m", "distkit", "run", *flags, "--force"]
    job = LocalJob(cmd, 2, env=_job_env({**env, "RELAXSGD_TEST_HOLD_AT": "6"}),
                   log_dir=os.path.join(out, "logs"), restarts=1)
    jenv = dict(job.envs[0])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "MASTER_ADDR", "MASTER_PORT", "RELAXSGD_TEST_HOLD_AT", "RELAXSGD_RESTART",
              "RELAXSGD_MAX_RESTARTS"):
        jenv.pop(k, None)
    joiner = subprocess.Popen([sys.executable, "-m", "distkit", "join",
                               f"127.0.0.1:{job.port}", *flags], env=jenv,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        codes = job.wait(timeout=90, grace=5.0)
        jout, _ = joiner.communicate(timeout=30)
    finally:
        job.stop(grace=1.0)
        if joiner.poll() is None:
            joiner.kill()
    r = _collect(codes, [job.output(k) for k in range(2)] + [jout], out, 0.0)
    r.codes.append(joiner.returncode)
    return r


def _check_joined(r: Any) -> None:
    assert r.codes == [0, 0, 0], "\n".join(r.logs)
    assert r.result is not None and r.result["status"] == "completed", "\n".join(r.logs)
    assert "worker 2 joined at" in r.logs[2], r.logs[2]
    events = [(e["worker"], e["event"]) for e in r.result["membership"]["events"]]
    assert events == [(2, "join")], events
    assert r.result["dist"]["lost_workers"] == {}
    # the joiner trained: rank 0 recorded rows with its snapshots (3 workers) at the
    # evaluation points after the join, every worker at the job's step count
    with open(os.path.join(r.out, "metrics.csv"), encoding="utf-8") as f:
        live = [int(float(row["live_workers"])) for row in csv.DictReader(f)]
    assert live[0] == 2 and 3 in live, live
    assert r.result["final"]["steps_per_worker"] == STEPS
    # (the joiner's FINAL snapshot can be missing under heavy load: its on-demand link to
    # rank 0 is sometimes read as closed without a goodbye at the job's end; see the
    # closing note of issue 20's join work)
    assert r.models is not None and r.models.shape[0] >= 2


@pytest.mark.timeout(150)
def test_a_new_worker_joins_a_local_sgd_job_and_takes_part_in_its_rounds(
        tmp_path: Any) -> None:
    cfg = {**BASE, "algo": "localsgd", "algo_options": {"p": 3}, "steps": STEPS,
           "workers": 2, "elastic": {"max_workers": 3}}
    r = _join_run(tmp_path, cfg, {})
    _check_joined(r)
    # one model: the joiner took part in the rounds (or listened to their results) ...
    assert all(torch.equal(m, r.models[0]) for m in r.models)
    # ... and it took part: its shard moved the mean away from the 2 workers' run
    plain = simulate(prepare(from_dict(cfg)))
    assert plain.result["status"] == "completed"
    assert not torch.allclose(r.models[0], plain.bank.X[0], atol=1e-4)


@pytest.mark.timeout(150)
def test_a_new_worker_joins_a_swarm_job_draws_partners_and_is_drawn(tmp_path: Any) -> None:
    partners = str(tmp_path / "partners")
    cfg = {**BASE, "algo": "swarm", "steps": STEPS, "workers": 2, "topology": "complete",
           "elastic": {"max_workers": 3}}
    r = _join_run(tmp_path, cfg, {"RELAXSGD_TEST_PARTNERS": partners})
    _check_joined(r)

    def drew(rank: int) -> list[int]:
        with open(f"{partners}.{rank}", encoding="utf-8") as f:
            return [int(x) for x in f.read().split()]

    assert drew(2) and set(drew(2)) <= {0, 1}  # the joiner drew partners among the live
    assert 2 in drew(0) + drew(1)  # and the others drew it


def test_joining_a_job_of_a_fixed_algorithm_is_refused_in_one_line_before_connecting() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE",
                                                                       "MASTER_"))}
    env["RELAXSGD_SECRET"] = os.urandom(32).hex()
    r = subprocess.run([sys.executable, "-m", "relaxsgd.cli", "join", "127.0.0.1:9",
                        "--algo", "dpsgd", "--workers", "2", "--task", "logreg",
                        "--set", "elastic.max_workers=3", "-q"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("relaxsgd: error: algorithm 'dpsgd' cannot take a new "
                               "worker (membership 'fixed'"), r.stderr
