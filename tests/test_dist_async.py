"""Real asynchrony in the distributed runtime: busy partners answer, stragglers and dead
workers do not hold an asynchronous algorithm back (gloo, 2-4 local processes).

Steps are paced by the compute model (``compute.step_time_s`` and ``speed_factors``: the
runtime sleeps to the modelled duration), so the timings below are set by the config and
not by the load of the machine.
"""

from __future__ import annotations

import statistics
from typing import Any

import pytest

from distkit import run_job, run_jobs
from relaxsgd.algorithms import ALGORITHMS

pytestmark = pytest.mark.dist

TASK: dict[str, Any] = {
    "task": "logreg", "task_options": {"n_train": 480, "n_test": 200, "dim": 8, "classes": 4},
    "train": {"batch_size": 8, "lr": 0.1},
}


@pytest.mark.timeout(60)
def test_a_busy_worker_answers_at_once_and_defers_to_its_step_boundary(tmp_path) -> None:
    # worker 1 runs one Compute of 20 steps x 50 ms; worker 0 asks it twice meanwhile
    cfg = {**TASK, "algo": "ping", "steps": 20, "evals": 1, "compute": {"step_time_s": 0.05}}
    r = run_job(cfg, 2, str(tmp_path), timeout=50)
    assert r.codes == [0, 0], r.logs
    f = r.result["final"]
    assert f["now_reply_s_mean"] < 0.1  # answered by the handler while computing
    assert 0 < f["now_step_mean"] < 20  # ... in the middle of the Compute
    assert f["deferred_step_mean"] == 20  # the Deferred answer: at its end
    assert f["deferred_reply_s_mean"] > 0.2


def _program_times(r: Any) -> list[float]:
    t = r.result["dist"]["program_time_s_per_worker"]
    return [t[str(k)] for k in range(len(t))]


@pytest.mark.timeout(120)
def test_a_3x_straggler_slows_allreduce_to_its_pace_but_not_swarm(tmp_path) -> None:
    steps, st = 60, 0.02  # 1.2 s of steps for a normal worker, 3.6 s for the straggler

    def cfg(algo: str, factors: list[float]) -> dict[str, Any]:
        return {**TASK, "algo": algo, "steps": steps, "evals": 1, "topology": "complete",
                "compute": {"step_time_s": st, "heterogeneity": "fixed",
                            "speed_factors": factors}}

    cases = [cfg(a, f) for a in ("swarm", "allreduce")
             for f in ([1, 1, 1, 1], [1, 1, 1, 3])]
    rs = run_jobs(cases, 4, str(tmp_path), timeout=100)
    assert rs[0].codes == [0] * 4, rs[0].logs
    swarm_base, swarm_slow, ar_base, ar_slow = (_program_times(r) for r in rs)
    # SwarmSGD: the three others keep their step rate (less than 20% slower)
    fast_base = statistics.mean(swarm_base[:3])
    fast_slow = statistics.mean(swarm_slow[:3])
    assert fast_slow < 1.2 * fast_base, (swarm_base, swarm_slow)
    assert swarm_slow[3] > 2.5 * steps * st  # the straggler really is 3x slower
    assert rs[1].result["final"]["interactions_per_worker"] > 0
    # all-reduce SGD: everyone runs at the straggler's pace (its 3.6 s of steps)
    assert min(ar_slow[:3]) > 0.85 * ar_slow[3], ar_slow
    assert min(ar_slow[:3]) > 0.9 * 3 * steps * st, (ar_base, ar_slow)
    assert max(ar_base) < 0.6 * min(ar_slow[:3]), (ar_base, ar_slow)


KILL: dict[str, Any] = {**TASK, "steps": 200, "evals": 4, "compute": {"step_time_s": 0.01}}


def _check_survivors(r: Any, algo: str) -> None:
    assert r.codes[2] == -9
    assert [r.codes[k] for k in (0, 1, 3)] == [0, 0, 0], r.logs
    res = r.result
    assert res["status"] == "completed"
    assert list(res["dist"]["lost_workers"]) == ["2"]
    if algo == "gossip":  # draws among all workers: the lost partner is tried, skipped
        assert res["final"]["peer_unavailable"] >= 1  # and counted
    # (swarm and adpsgd draw among the live workers (Members()): once a survivor knows of
    # the loss it never tries the dead partner, so a count of 0 is right there)
    assert res["final"]["steps_per_worker"] == 200  # (mean over the 3 who finished)
    assert float(r.metrics()[-1]["step"]) == 200


@pytest.mark.timeout(60)
def test_asynchronous_gossip_goes_on_without_a_killed_worker(tmp_path) -> None:
    r = run_job({**KILL, "algo": "gossip"}, 4, str(tmp_path), timeout=50, kill=(2, 40))
    _check_survivors(r, "gossip")
    assert r.result["final"]["skipped"] == r.result["final"]["peer_unavailable"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algo", ["swarm", "adpsgd"])
def test_swarm_and_adpsgd_go_on_without_a_killed_worker(tmp_path, algo: str) -> None:
    if algo not in ALGORITHMS:
        pytest.skip(f"{algo} is not registered")
    r = run_job({**KILL, "algo": algo}, 4, str(tmp_path), timeout=50, kill=(2, 40))
    _check_survivors(r, algo)
