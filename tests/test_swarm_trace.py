"""SwarmSGD's sequential schedule under a churn trace known in advance (issue 20,
algorithms/swarm_sequential.py), in the simulator: edges drawn among the live workers,
the sum of the models kept across a leave and a rejoin, the rejoiner's place in its plan.
The dist runtime's parity for the same trace is in tests/test_dist_scripted.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from relaxsgd.config import from_dict
from relaxsgd.errors import ConfigError
from relaxsgd.run import prepare
from relaxsgd.simulation import Simulation
from simkit import TINY
from test_membership import _model, _spy

SEQ = {"schedule": "sequential", "quantizer": "none", "H": 2}
TRACE = "worker,event,step\n2,leave,4\n2,rejoin,10\n"


def _sim(tmp_path: Path, trace: str, **over: Any) -> Simulation:
    (tmp_path / "trace.csv").write_text(trace)
    cfg = {**TINY, "algo": "swarm", "algo_options": SEQ, "workers": 4, "steps": 16,
           "topology": "complete", "elastic": {"churn": {"trace": str(tmp_path / "trace.csv")}},
           **over}
    return Simulation(prepare(from_dict(cfg)))


def test_the_sum_of_the_models_is_kept_across_a_leave_and_a_rejoin(tmp_path: Path) -> None:
    # lr ~0: only the pairwise averages move the models; every model starts different
    sim = _sim(tmp_path, TRACE, train={**TINY.get("train", {}), "lr": 1e-12,
                                       "momentum": 0.0})
    torch.manual_seed(1)
    sim.bank.X.copy_(torch.randn_like(sim.bank.X))
    start = sim.bank.X.double().sum(0)
    log = _spy(sim)
    out = sim.run()
    assert [(k, r) for k, r, _ in log] == [("leave", 2), ("handover", 2), ("copied", 2)]
    gone, donor_model = log[0][2], log[1][2][1]
    assert log[1][2][0] == 0  # the rejoiner's lowest-id live neighbour
    end = sum(_model(sim, w) for w in sim.workers)
    # the leaver's model left the sum; the rejoiner brought its donor's back in
    torch.testing.assert_close(end, start - gone + donor_model, atol=1e-5, rtol=0)
    assert out.result["status"] == "completed"
    assert out.result["final"].get("peer_unavailable", 0) == 0  # nobody drew the absent


def test_edges_are_drawn_among_the_live_workers_and_the_rejoiner_takes_part_again(
        tmp_path: Path) -> None:
    sim = _sim(tmp_path, TRACE)
    plans = [sim.prep.algo.plan(r, sim.prep.total_steps) for r in range(4)]
    mine = plans[2]
    left_after = max(t for t, _, _, _ in mine if t < 30 and
                     sum(h for u, _, h, _ in mine if u <= t) >= 4 and
                     sum(h for u, _, h, _ in mine if u < t) < 4)
    gap = [t for t, _, _, _ in mine if t > left_after]
    assert gap, "the rejoiner never takes part again"
    away = range(left_after + 1, gap[0])
    assert len(away) > 3  # it was out for a while ...
    for r in (0, 1, 3):  # ... and nobody's plan had an edge to it then
        assert not [t for t, j, _, _ in plans[r] if j == 2 and t in away]
    out = sim.run()
    assert out.result["status"] == "completed"
    assert [e["event"] for e in out.result["membership"]["events"]] == ["leave", "rejoin"]


@pytest.mark.parametrize("churn,fragment", [
    ({"mtbf_s": 60.0, "downtime_s": 1.0}, "only a churn trace keyed by step"),
    ({"trace": "time"}, "not time-keyed"),
])
def test_other_churn_is_refused_for_the_sequential_schedule(tmp_path: Path,
                                                            churn: dict[str, Any],
                                                            fragment: str) -> None:
    if churn.get("trace") == "time":
        (tmp_path / "t.csv").write_text("worker,event,time\n2,leave,0.01\n")
        churn = {"trace": str(tmp_path / "t.csv")}
    cfg = {**TINY, "algo": "swarm", "algo_options": SEQ, "workers": 4,
           "elastic": {"churn": churn}}
    with pytest.raises(ConfigError, match=fragment):
        Simulation(prepare(from_dict(cfg)))


@pytest.mark.parametrize("rows, fragment", [
    ("worker,event,step\n1,leave,2\n3,join,4\n", "worker 3 joins; the dist runtime plays"),
    ("worker,event,step\n0,leave,2\n", "worker 0 leaves; in the dist runtime worker 0"),
    ("worker,event,time\n1,leave,2.5\n", "is keyed by time; the dist runtime plays only"),
])
def test_a_trace_the_dist_runtime_cannot_play_is_one_line(tmp_path, rows, fragment) -> None:
    """distributed.scripted.trace_events: every worker refuses these before connecting
    (a join is a new process; worker 0 hosts the outputs; virtual seconds)."""
    from relaxsgd.distributed.scripted import trace_events

    (tmp_path / "t.csv").write_text(rows)
    cfg = from_dict({"workers": 3, "elastic": {"max_workers": 4,
                                               "churn": {"trace": str(tmp_path / "t.csv")}}})
    with pytest.raises(ConfigError) as e:
        trace_events(cfg)
    assert fragment in str(e.value) and "\n" not in str(e.value)
