"""Elastic membership in the simulator (issue 20): churn, handover, quorum rounds.

Each test is built to fail when the rule it checks is broken: a leaver's model kept in the
sum, a handover that copies the wrong row or skips the momentum, a mean divided by n
instead of the participants, a quorum failure that does not wait or names nobody, draws
that depend on more than (seed, worker), a bad trace that passes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import simkit
from relaxsgd.membership import ChurnDraws, Membership, QuorumLost
from relaxsgd.run import prepare
from relaxsgd.simulation import Simulation


def _sim(tmp_path: Path, algo: str, trace: str | None = None, **over: Any) -> Simulation:
    elastic = dict(over.pop("elastic", {}))
    if trace is not None:
        (tmp_path / "trace.csv").write_text(trace)
        elastic.setdefault("churn", {})["trace"] = str(tmp_path / "trace.csv")
    return Simulation(prepare(simkit.tiny(algo=algo, elastic=elastic, **over)))


def _spy(sim: Simulation) -> list[tuple[str, int, Any]]:
    """Record (event, worker, data) at every leave and handover of ``sim``'s engine."""
    eng, log = sim.engine, []
    leave, hand = eng._leave, eng._hand_over

    def on_leave(p: Any, cause: str) -> None:
        log.append(("leave", p.w.rank, _model(sim, p.w)))
        leave(p, cause)

    def on_hand(donor: Any, p: Any, cause: str) -> None:
        log.append(("handover", p.w.rank, (donor.w.rank, _model(sim, donor.w),
                                           sim.bank.M[donor.w.row].clone(), donor.w.step)))
        hand(donor, p, cause)
        log.append(("copied", p.w.rank, (_model(sim, p.w), sim.bank.M[p.w.row].clone(),
                                         p.w.step)))

    eng._leave, eng._hand_over = on_leave, on_hand
    return log


def _model(sim: Simulation, w: Any) -> torch.Tensor:
    """A worker's model with the averages its handlers have not absorbed yet (SwarmSGD)."""
    x = sim.bank.X[w.row].clone().double()
    acc = w.state.get("acc")
    return x + acc.double() if acc is not None else x


def test_swarm_pairwise_averaging_keeps_the_sum_across_a_leave_and_a_join(tmp_path) -> None:
    # lr 0: only averaging moves the models; every model starts different
    sim = _sim(tmp_path, "swarm", "worker,event,step\n2,leave,2\n4,join,4\n",
               train={"lr": 1e-12, "momentum": 0.0}, steps=12,
               algo_options={"quantizer": "none", "H": 2},
               elastic={"max_workers": 5})
    torch.manual_seed(1)
    sim.bank.X.copy_(torch.randn_like(sim.bank.X))
    for w in sim.workers:
        if "xhat" in w.state:
            w.state["xhat"].copy_(w.params)
    start = sim.bank.X[:4].double().sum(0)
    log = _spy(sim)
    out = sim.run()
    kinds = [(k, r) for k, r, _ in log]
    assert kinds == [("leave", 2), ("handover", 4), ("copied", 4)], kinds
    gone = log[0][2]
    donor_model = log[1][2][1]
    live = [p.w.rank for p in sim.engine.procs if not p.gone]
    assert live == [0, 1, 3, 4]
    end = sum(_model(sim, sim.workers[r]) for r in live)
    assert torch.allclose(end, start - gone + donor_model, atol=1e-5, rtol=0)
    # and the averaging did happen (the test would pass trivially without interactions)
    assert out.result["final"]["interactions_per_worker"] > 1
    assert out.result["membership"]["events"][1]["event"] == "join"
    # partners are drawn among the live workers: none asked the departed one
    assert out.result["final"].get("peer_unavailable", 0) == 0


def test_a_rejoined_worker_starts_from_its_donors_state(tmp_path) -> None:
    sim = _sim(tmp_path, "localsgd", "worker,event,step\n1,leave,3\n1,rejoin,7\n",
               algo_options={"p": 2}, steps=14, train={"momentum": 0.9})
    log = _spy(sim)
    sim.run()
    (_, _, (donor, x_d, m_d, step_d)), (_, who, (x_j, m_j, step_j)) = log[1], log[2]
    assert who == 1 and donor == 0  # the lowest live id
    # the first safe point at or past step 7 is 8
    assert torch.equal(x_j, x_d) and torch.equal(m_j, m_d) and step_j == step_d == 8
    assert not torch.equal(x_j, log[0][2])  # it did not keep its own stale model


def test_a_rejoiner_zeroes_the_error_feedback_residual_it_copied(tmp_path) -> None:
    sim = _sim(tmp_path, "efsgd", "worker,event,step\n3,leave,2\n3,rejoin,5\n",
               steps=10, algo_options={"compressor": "topk:ratio=0.25"})
    seen: dict[str, torch.Tensor] = {}
    adopt = sim.prep.algo.adopt

    def spy(w: Any, donor: int) -> None:
        seen["donor"] = sim.workers[donor].state["agg"]["comp"]["residual"].clone()
        adopt(w, donor)
        seen["joiner"] = w.state["agg"]["comp"]["residual"].clone()

    sim.prep.algo.adopt = spy
    sim.run()
    assert seen["donor"].abs().sum() > 0 and seen["joiner"].abs().sum() == 0


def test_a_synchronous_round_averages_exactly_its_participants(tmp_path) -> None:
    # worker i's model is all i; worker 3 leaves before the first average: (0+1+2)/3 = 1,
    # not (0+1+2+3)/4 = 1.5, nor (0+1+2)/4 = 0.75
    sim = _sim(tmp_path, "localsgd", "worker,event,step\n3,leave,0\n",
               algo_options={"p": 1}, steps=3, train={"lr": 1e-30, "momentum": 0.0})
    for r in range(4):
        sim.bank.X[r].fill_(float(r))
    out = sim.run()
    for r in range(3):
        assert torch.equal(sim.bank.X[r], torch.ones_like(sim.bank.X[r])), sim.bank.X[r][:3]
    assert torch.equal(sim.bank.X[3], torch.full_like(sim.bank.X[3], 3.0))  # left as it was
    assert out.rows[-1]["live_workers"] == 3


def test_a_round_below_the_minimum_waits_then_fails_naming_who_is_missing(tmp_path) -> None:
    trace = "worker,event,time\n2,leave,0.005\n3,leave,0.005\n"
    sim = _sim(tmp_path, "localsgd", trace, algo_options={"p": 2}, steps=8,
               elastic={"min_quorum": 3, "quorum_wait_s": 0.5})
    with pytest.raises(QuorumLost) as e:
        sim.run()
    line = str(e.value)
    assert "\n" not in line and "missing [2, 3]" in line and "min_quorum=3" in line, line
    assert sim.engine.now >= 0.5  # it waited before failing
    # a worker back within the wait rescues the round
    ok = _sim(tmp_path, "localsgd", trace + "2,rejoin,0.3\n", algo_options={"p": 2},
              steps=8, elastic={"min_quorum": 3, "quorum_wait_s": 0.5}).run()
    assert ok.result["status"] == "completed"
    assert [e["event"] for e in ok.result["membership"]["events"]] == \
        ["leave", "leave", "rejoin"]


def test_churn_draws_depend_on_seed_and_worker_only() -> None:
    a, b = ChurnDraws(7, 600.0), ChurnDraws(7, 600.0)
    first = [a.next_failure(1, 0.0) for _ in range(3)]
    b.next_failure(0, 0.0)  # another worker's draws do not shift worker 1's
    assert [b.next_failure(1, 0.0) for _ in range(3)] == first
    assert ChurnDraws(8, 600.0).next_failure(1, 0.0) != first[0]
    assert ChurnDraws(7, 600.0).next_failure(0, 0.0) != first[0]  # each worker its own
    assert ChurnDraws(7, None).next_failure(1, 0.0) is None


def test_a_churn_run_is_deterministic_under_its_seed(tmp_path) -> None:
    def events(seed: int) -> list:
        cfg = simkit.tiny(algo="swarm", steps=24, seed=seed,
                          elastic={"churn": {"mtbf_s": 0.2, "downtime_s": 0.05}})
        out = Simulation(prepare(cfg)).run()
        return [out.result["membership"]["events"], out.result["final"]["loss_mean_model"]]

    first = events(0)
    assert len(first[0]) >= 4
    assert events(0) == first and events(1) != first


def test_membership_log() -> None:
    m = Membership(3, 5, min_quorum=2)
    m.leave(1.0, 1, "churn")
    assert m.admit(2.0, 1, "churn") == "rejoin" and m.next_new_id() == 3
    assert m.admit(2.0, 3, "churn") == "join"
    assert m.members() == (0, 1, 2, 3)
    assert m.record()["live_over_time"] == [[0.0, 3], [1.0, 2], [2.0, 4]]


BAD_TRACES = [
    ("", "is empty"),
    ("worker,when\n1,2\n", "it needs worker, event and one of time"),
    ("worker,event,time\n9,leave,1\n", "not an id in 0..1"),
    ("worker,event,time\n1,explode,1\n", "choose one of: leave, rejoin, join"),
    ("worker,event,time\n1,leave,-3\n", "finite number of seconds >= 0"),
    ("worker,event,time\n1,rejoin,1\n", "rejoins but has not left"),
    ("worker,event,time\n1,leave,1\n1,leave,2\n", "leaves but is not live"),
    ("worker,event,step\n1,leave,x\n", "whole number"),
]


@pytest.mark.parametrize("text,fragment", BAD_TRACES)
def test_a_bad_trace_is_one_line_and_exit_2(tmp_path, capsys, text, fragment) -> None:
    from relaxsgd.cli import main

    (tmp_path / "t.csv").write_text(text)
    code = main(["run", "--algo", "localsgd", "--task", "logreg", "--workers", "2",
                 "--steps", "4", "-q", "--set", f"elastic.churn.trace={tmp_path / 't.csv'}",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize("sets,fragment", [
    (["elastic.churn.mtbf_s=-1"], "mtbf_s"),
    (["elastic.churn.downtime_s=5"], "takes effect only with elastic.churn.mtbf_s"),
    (["elastic.min_quorum=9"], "can never be met"),
    (["elastic.churn.joins=1"], "set elastic.max_workers=3"),
    (["elastic.nope=1"], "unknown elastic option"),
    (["elastic.churn.mtbf_s=60", "--algo", "dpsgd"], "membership 'fixed'"),
    (["elastic.churn.mtbf_s=60", "checkpoint_every=2"], "checkpoint_every cannot be combined"),
])
def test_bad_churn_config_is_one_line_and_exit_2(tmp_path, capsys, sets, fragment) -> None:
    from relaxsgd.cli import main

    args = ["run", "--task", "logreg", "--workers", "2", "--steps", "4", "-q",
            "--out", str(tmp_path / "o")]
    for s in sets:
        args += [s] if s.startswith("-") or "=" not in s else ["--set", s]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err, err


def test_a_lost_quorum_exits_5_after_writing_the_result(tmp_path, capsys) -> None:
    import json

    from relaxsgd.cli import main

    (tmp_path / "t.csv").write_text("worker,event,time\n1,leave,0.001\n")
    code = main(["run", "--algo", "localsgd", "--task", "logreg", "--workers", "2",
                 "--steps", "6", "-q", "--step-time", "0.01",
                 "--set", f"elastic.churn.trace={tmp_path / 't.csv'}",
                 "--set", "elastic.min_quorum=2", "--set", "elastic.quorum_wait_s=1",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 5 and err.count("\n") == 1 and "missing [1]" in err, err
    res = json.loads((tmp_path / "o" / "result.json").read_text())
    assert res["status"] == "failed" and res["membership"]["events"][0]["worker"] == 1


def test_a_run_whose_workers_all_left_fails_with_one_line(tmp_path) -> None:
    sim = _sim(tmp_path, "swarm", "worker,event,time\n0,leave,0.01\n1,leave,0.01\n"
               "2,leave,0.02\n3,leave,0.03\n", steps=20)
    with pytest.raises(QuorumLost, match=r"every worker left \(the last at t=0.03s\)"):
        sim.run()


def test_compare_and_report_show_the_membership(tmp_path, capsys) -> None:
    import json

    from relaxsgd.cli import main

    (tmp_path / "t.csv").write_text("worker,event,step\n1,leave,2\n1,rejoin,4\n")
    out = tmp_path / "c"
    assert main(["compare", "--algos", "localsgd,swarm", "--task", "logreg", "--workers", "3",
                 "--steps", "8", "-q", "--step-time", "0.01", "--set", "localsgd.p=2",
                 "--set", f"elastic.churn.trace={tmp_path / 't.csv'}",
                 "--out", str(out)]) == 0
    for a in ("localsgd", "swarm"):
        res = json.loads((out / a / "result.json").read_text())
        assert [e["event"] for e in res["membership"]["events"]] == ["leave", "rejoin"], a
    assert (out / "live_workers_vs_time.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["report", str(out / "localsgd")]) == 0
    assert "worker 1 leave (trace)" in capsys.readouterr().out
    assert "live_workers" in (out / "swarm" / "metrics.csv").read_text().splitlines()[0]


def test_the_mean_models_batchnorm_statistics_are_the_live_workers(tmp_path) -> None:
    """Under churn the mean model averages the live rows' parameters, so its BatchNorm
    statistics must be the live rows' too: a departed row's statistics would describe a
    model nobody holds."""
    import dataclasses

    from torch import nn

    from relaxsgd.bank import Bank

    prep = prepare(simkit.tiny(workers=3))
    d_in = prep.spec.data.x_train.shape[1]

    def bn_model() -> nn.Module:
        return nn.Sequential(nn.Linear(d_in, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))

    spec = dataclasses.replace(prep.spec, model_fn=bn_model)
    bank = Bank(spec, prep.cfg.train, [0, 1, 2], prep.shards, 0, 10, batching="loop")
    for k, v in enumerate((1.0, 2.0, 9.0)):
        bank.buffers_of(k)["1.running_mean"].fill_(v)
    assert torch.allclose(bank.mean_buffers()["1.running_mean"], torch.full((4,), 4.0))
    got = bank.mean_buffers([0, 1])
    assert torch.allclose(got["1.running_mean"], torch.full((4,), 1.5))
    assert got["1.num_batches_tracked"].dtype == torch.long


def test_evaluation_under_churn_asks_for_the_live_rows_statistics(tmp_path) -> None:
    sim = _sim(tmp_path, "localsgd", "worker,event,step\n1,leave,3\n",
               algo_options={"p": 2}, steps=10, evals=5)
    asked: list[Any] = []
    real = sim.bank.mean_buffers
    sim.bank.mean_buffers = lambda rows=None: asked.append(rows) or real(rows)  # type: ignore
    sim.run()
    assert [0, 2, 3] in asked, asked  # after the leave: the live rows only
