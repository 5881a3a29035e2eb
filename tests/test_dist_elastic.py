"""Elastic dist jobs (issue 20): sim/dist parity for the same membership trace.

Worker 2 of 3 is killed (SIGKILL, distkit's ``RELAXSGD_TEST_LEAVE_AT`` hook) at its first
safe point at or past local step 6; in the simulator the trace ``2,leave,6`` makes it leave
at that same safe point. The survivors go on in quorum rounds on the transport
(no gloo group) and must end with the simulator's models, bytes aside."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from distkit import run_job
from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate

pytestmark = pytest.mark.dist

N = 3
BASE: dict[str, Any] = {
    "task": "logreg", "task_options": {"n_train": 480, "n_test": 200, "dim": 8, "classes": 4},
    "steps": 16, "evals": 3, "compute": {"step_time_s": 0.002},
    "train": {"batch_size": 8, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
}
CASES = [("allreduce", {}), ("localsgd", {"p": 3})]


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
    # and not the run without the leave (the test can tell them apart)
    plain = simulate(prepare(from_dict({**cfg, "workers": N})))
    assert not torch.allclose(r.models, plain.bank.X[:2], atol=1e-4)
    assert os.path.exists(os.path.join(r.out, "metrics.csv"))
