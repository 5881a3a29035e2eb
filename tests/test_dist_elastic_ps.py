"""The parameter server in an elastic dist job (issue 20): server rounds are quorum rounds.

OLCO3 with a parameter server (``aggregation: ps``, two-way top-k, server error feedback)
on 3 workers; worker 2 is killed at its first safe point at or past local step 6 (distkit's
``RELAXSGD_TEST_LEAVE_AT``), as the simulator's trace ``2,leave,6`` takes it away there.
From then on the server serves the two survivors' uploads, averaged over them: the
survivors must end with the simulator's models (staleness 0: no round is in flight at a
safe point, so the rounds' participants do not depend on timing)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distkit import run_job
from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate
from test_dist_parity import BASE, N

pytestmark = pytest.mark.dist

PS = {"p": 2, "s": 0, "compressor": "topk:ratio=0.25", "aggregation": "ps",
      "server_compressor": "topk:ratio=0.1"}


@pytest.mark.timeout(120)
def test_a_leave_in_an_olco3_ps_job_gives_the_simulators_models(tmp_path: Any) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("worker,event,step\n2,leave,6\n")
    cfg = {**BASE, "algo": "olco3", "algo_options": PS}
    r = run_job(cfg, N, str(tmp_path / "dist"), timeout=90,
                env={"RELAXSGD_ELASTIC": "1", "RELAXSGD_TEST_LEAVE_AT": "2:6"})
    assert r.codes[:2] == [0, 0] and r.codes[2] == -9, "\n".join(r.logs)
    assert r.result is not None and r.result["status"] == "completed"
    sim = simulate(prepare(from_dict({**cfg, "workers": N,
                                      "elastic": {"churn": {"trace": str(trace)}}})))
    assert sim.result["status"] == "completed"
    assert r.models is not None and r.models.shape[0] == 2  # the survivors' finals
    torch.testing.assert_close(r.models, sim.bank.X[:2], rtol=1e-5, atol=2e-6)
    # the server's replies were counted as the simulator's (declared bytes)
    assert r.result["final"]["bytes_sent_total"] > 0
    plain = simulate(prepare(from_dict({**cfg, "workers": N})))  # (the test can tell)
    assert not torch.allclose(r.models, plain.bank.X[:2], atol=1e-4)
