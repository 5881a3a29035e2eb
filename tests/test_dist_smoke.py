"""Every registered algorithm runs in the distributed runtime with its defaults (4 gloo
processes, a few steps each, one after the other in the same processes): it completes,
every worker does its local steps, the loss falls, every worker sent something and the
bytes it reports are those it counted, and for the deterministic algorithms the bytes are
exactly the simulator's (the declared encoded sizes through the same collectives)."""

from __future__ import annotations

import pytest

from distkit import run_jobs
from relaxsgd.algorithms import ALGORITHMS
from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate

pytestmark = pytest.mark.dist

NAMES = ALGORITHMS.names()
TIMING_DEPENDENT = {"swarm", "adpsgd"}  # asynchronous: who talks to whom depends on timing


@pytest.mark.timeout(240)
def test_every_registered_algorithm_completes_under_the_distributed_runtime(tmp_path) -> None:
    base = {"task": "logreg", "task_options": {"n_train": 480, "n_test": 200, "dim": 8,
                                               "classes": 4},
            "steps": 12, "evals": 2, "train": {"batch_size": 8, "lr": 0.05}}
    rs = run_jobs([{**base, "algo": a} for a in NAMES], 4, str(tmp_path), timeout=200)
    assert rs[0].codes == [0] * 4, "\n".join(rs[0].logs)
    for name, r in zip(NAMES, rs, strict=True):
        res = r.result
        assert res is not None and res["status"] == "completed", name
        assert res["final"]["steps_per_worker"] == 12, name
        assert res["dist"]["lost_workers"] == {}, name
        per = res["dist"]["bytes_sent_per_worker"]
        assert len(per) == 4 and min(per.values()) > 0, name
        total = res["final"]["bytes_sent_total"]
        assert sum(per.values()) <= total, name  # (plus a parameter server's replies)
        rows = r.metrics()
        assert len(rows) >= 2, name
        assert float(rows[-1]["loss_mean_model"]) < float(rows[0]["loss_mean_model"]), name
        if name not in TIMING_DEPENDENT:
            sim = simulate(prepare(from_dict({**base, "algo": name, "workers": 4})))
            assert total == sim.result["final"]["bytes_sent_total"], name
