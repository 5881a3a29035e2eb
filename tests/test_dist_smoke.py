"""Every registered algorithm runs in the distributed runtime with its defaults (4 gloo
processes, a few steps each, one after the other in the same processes): it completes,
every worker does its local steps, and the bytes it reports are those it counted."""

from __future__ import annotations

import pytest

from relaxsgd.algorithms import ALGORITHMS
from relaxsgd.dist.testing import run_jobs

pytestmark = pytest.mark.dist

NAMES = ALGORITHMS.names()


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
        assert len(per) == 4 and sum(per.values()) <= res["final"]["bytes_sent_total"], name
        assert len(r.metrics()) >= 2, name
