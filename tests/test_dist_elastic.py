"""Elastic dist jobs (issue 20): sim/dist parity for the same membership trace.

Worker 2 of 3 is killed (SIGKILL, distkit's ``RELAXSGD_TEST_LEAVE_AT`` hook) at its first
safe point at or past local step 6; in the simulator the trace ``2,leave,6`` makes it leave
at that same safe point. The survivors go on in quorum rounds on the transport
(no gloo group; OLCO3's server rounds too) and must end with the simulator's models,
bytes aside."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import pytest
import torch

from distkit import _collect, _job_env, run_job
from relaxsgd.config import from_dict
from relaxsgd.distributed.launch import LocalJob, _restart_dead
from relaxsgd.run import prepare, simulate
from test_dist_parity import BASE, N  # the parity tests' job: the same 3 workers

pytestmark = pytest.mark.dist

# DiLoCo's rounds are all-reduces of a spawned sub-program: the spawns' quorum rounds.
# OLCO3 with a parameter server (two-way top-k, server error feedback): its server rounds
# are quorum rounds led by rank 0, serving the survivors' uploads, averaged over them
# (staleness 0: no round is in flight at a safe point, so the participants do not depend
# on timing).
OLCO3_PS = {"p": 2, "s": 0, "compressor": "topk:ratio=0.25", "aggregation": "ps",
            "server_compressor": "topk:ratio=0.1"}
CASES = [("allreduce", {}), ("localsgd", {"p": 3}), ("diloco", {"p": 3}),
         ("olco3", OLCO3_PS)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo,opts", CASES, ids=[c[0] for c in CASES])
def test_a_leave_at_a_fixed_step_gives_the_simulators_models(tmp_path: Any, algo: str,
                                                            opts: dict[str, Any]) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("worker,event,step\n2,leave,6\n")
    cfg = {**BASE, "algo": algo, "algo_options": opts}
    r = run_job(cfg, N, str(tmp_path / "dist"), timeout=90,
                env={"RELAXSGD_ELASTIC": "1", "RELAXSGD_TEST_LEAVE_AT": "2:6"})
    assert r.codes[:2] == [0, 0] and r.codes[2] == -9, "\n".join(r.logs)
    assert r.result is not None and r.result["status"] == "completed"
    sim = simulate(prepare(from_dict({**cfg, "workers": N,
                                      "elastic": {"churn": {"trace": str(trace)}}})))
    assert sim.result["status"] == "completed"
    assert r.models is not None and r.models.shape[0] == 2  # the survivors' finals
    torch.testing.assert_close(r.models, sim.bank.X[:2], rtol=1e-5, atol=2e-6)
    assert r.result["final"]["bytes_sent_total"] > 0  # (OLCO3: the server's replies too)
    # and not the run without the leave (the test can tell them apart)
    plain = simulate(prepare(from_dict({**cfg, "workers": N})))
    assert not torch.allclose(r.models, plain.bank.X[:2], atol=1e-4)
    assert os.path.exists(os.path.join(r.out, "metrics.csv"))


def _cfg_file(tmp_path: Any, cfg: dict[str, Any]) -> str:
    import yaml

    path = str(tmp_path / "job.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({**BASE, **cfg, "workers": N}, f)
    return path


@pytest.mark.timeout(120)
def test_a_killed_worker_restarted_by_the_launcher_rejoins_by_live_recovery(
        tmp_path: Any) -> None:
    """Worker 2 dies at step 6; ``launch --restarts 1`` starts it again; it takes the
    model from worker 0 at a safe point (the others wait there for it: distkit's hold
    hook) and all-reduce SGD ends with three identical models and nobody lost."""
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "distkit", "run", "--config",
           _cfg_file(tmp_path, {"algo": "allreduce", "steps": 24}), "--runtime", "dist",
           "--out", out, "--force", "-q"]
    env = _job_env({"RELAXSGD_TEST_LEAVE_AT": "2:6", "RELAXSGD_TEST_HOLD_AT": "12"})
    job = LocalJob(cmd, N, env=env, log_dir=os.path.join(out, "logs"), restarts=1)
    given_up: set[int] = set()
    end = time.monotonic() + 100
    try:
        while any(c is None for c in job.poll()) and time.monotonic() < end:
            _restart_dead(job, given_up)  # what the launcher's main loop does
            time.sleep(0.05)
        codes = job.wait(timeout=1, grace=2.0)
    finally:
        job.stop(grace=1.0)
    r = _collect(codes, [job.output(k) for k in range(N)], out, 0.0)
    assert codes == [0, 0, 0] and job.incarnations == [0, 0, 1], "\n".join(r.logs)
    assert r.result is not None and r.result["status"] == "completed"
    assert r.result["dist"]["lost_workers"] == {}
    assert r.models is not None and r.models.shape[0] == N
    assert torch.equal(r.models[2], r.models[0]) and torch.equal(r.models[1], r.models[0])
    # the rejoined worker trained from step 12 on, not from 0: the same steps as the others
    assert r.result["final"]["steps_per_worker"] == 24


@pytest.mark.timeout(60)
def test_below_the_minimum_quorum_the_survivors_wait_then_fail_naming_who_is_missing(
        tmp_path: Any) -> None:
    cfg = {**BASE, "algo": "allreduce",
           "elastic": {"min_quorum": 3, "quorum_wait_s": 1.0}}
    r = run_job(cfg, N, str(tmp_path / "dist"), timeout=50,
                env={"RELAXSGD_ELASTIC": "1", "RELAXSGD_TEST_LEAVE_AT": "2:6"})
    assert r.codes[:2] == [5, 5] and r.codes[2] == -9, "\n".join(r.logs)
    lines = [ln for ln in r.logs[0].splitlines() if ln.startswith("relaxsgd: error")]
    assert len(lines) == 1 and "missing [2]" in lines[0] and "min_quorum=3" in lines[0], \
        r.logs[0]
