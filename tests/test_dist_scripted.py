"""Scripted churn in the dist runtime (issue 20): a kill and a rejoin at fixed steps give
the simulator's models, for all-reduce SGD, Local SGD and SwarmSGD (distributed/scripted.py).

Worker 2 of 3 leaves at its first safe point at or past local step 6 and rejoins at its
donor's first safe point at or past step 12 (``2,leave,6`` then ``2,rejoin,12``): in the
dist runtime it drops its state and takes the donor's over the transport (live
recovery), in the simulator the engine does the same at the same points."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from distkit import run_job
from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate
from test_dist_elastic import OLCO3_PS
from test_dist_parity import BASE, N

pytestmark = pytest.mark.dist

TRACE = "worker,event,step\n2,leave,6\n2,rejoin,12\n"
# SwarmSGD's sequential schedule: its edges are drawn among the workers live at each t
SWARM = {"schedule": "sequential", "quantizer": "none", "H": 2}
# OLCO3 through a parameter server: the server's rounds count the rejoiner in too
CASES = [("allreduce", {}), ("localsgd", {"p": 3}), ("swarm", SWARM),
         ("olco3", OLCO3_PS)]


def _sim(cfg: dict[str, Any]) -> Any:
    out = simulate(prepare(from_dict({**cfg, "workers": N})))
    assert out.result["status"] == "completed"
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("algo,opts", CASES, ids=[c[0] for c in CASES])
def test_a_leave_and_a_rejoin_at_fixed_steps_give_the_simulators_models(
        tmp_path: Any, algo: str, opts: dict[str, Any]) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text(TRACE)
    cfg = {**BASE, "algo": algo, "algo_options": opts,
           "elastic": {"churn": {"trace": str(trace)}}}
    r = run_job(cfg, N, str(tmp_path / "dist"), timeout=90)
    assert r.codes == [0, 0, 0], "\n".join(r.logs)
    assert r.result is not None and r.result["status"] == "completed"
    # (SwarmSGD's safe points are its interactions: the first one at or past step 12)
    assert "worker 2 rejoined (elastic.churn.trace) with worker 0's state at its step " + \
        ("12" if algo != "swarm" else "") in r.logs[2]
    events = [(e["worker"], e["event"]) for e in r.result["membership"]["events"]]
    assert events == [(2, "leave"), (2, "rejoin")]
    sim = _sim(cfg)
    assert r.models is not None and r.models.shape[0] == N
    torch.testing.assert_close(r.models, sim.bank.X, rtol=1e-5, atol=2e-6)
    # not the run with the leave alone, nor the run without churn
    trace.write_text("worker,event,step\n2,leave,6\n")
    gone = _sim(cfg)
    assert not torch.allclose(r.models[:2], gone.bank.X[:2], atol=1e-4)
    plain = _sim({k: v for k, v in cfg.items() if k != "elastic"})
    assert not torch.allclose(r.models, plain.bank.X, atol=1e-4)


@pytest.mark.timeout(60)
def test_a_trace_keyed_by_time_is_one_line_and_exit_2_on_every_worker(tmp_path: Any) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("worker,event,time\n2,leave,0.5\n")
    cfg = {**BASE, "algo": "allreduce", "elastic": {"churn": {"trace": str(trace)}}}
    r = run_job(cfg, N, str(tmp_path / "dist"), timeout=50)
    assert r.codes == [2, 2, 2], "\n".join(r.logs)
    lines = [ln for ln in r.logs[1].splitlines() if ln.strip()]
    assert len(lines) == 1 and "keyed by time" in lines[0] and "worker,event,step" in \
        lines[0], r.logs[1]


@pytest.mark.timeout(90)
def test_a_scripted_leave_without_rejoin_ends_that_process_and_the_others_go_on(
        tmp_path: Any) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("worker,event,step\n2,leave,6\n")
    cfg = {**BASE, "algo": "localsgd", "algo_options": {"p": 3},
           "elastic": {"churn": {"trace": str(trace)}}}
    r = run_job(cfg, N, str(tmp_path / "dist"), timeout=60)
    assert r.codes == [0, 0, 0], "\n".join(r.logs)
    assert r.result is not None and r.result["status"] == "completed"
    assert r.models is not None and r.models.shape[0] == 2  # the survivors' finals
    torch.testing.assert_close(r.models, _sim(cfg).bank.X[:2], rtol=1e-5, atol=2e-6)
