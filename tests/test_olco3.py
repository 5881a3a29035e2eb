"""OLCO3: its special cases against the baselines, the delay-free invariant of the mean
model, and the stall time against an independent model of the schedule."""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
import torch

from refkit import COMPRESSORS, Reference, mean
from relaxsgd.algorithms.efsgd import make_aggregator
from relaxsgd.algorithms.olco3 import OLCO3Config
from relaxsgd.bank import evaluate
from relaxsgd.errors import ConfigError
from relaxsgd.run import prepare, simulate
from relaxsgd.sim.collectives import allgather_cost
from relaxsgd.sim.network import make_network_config
from relaxsgd.training import flat_params
from simkit import tiny

# The tests below are of all-reduce mode unless they say ps (OLCO3's default aggregation
# is ps since issue 11: the best configuration measured in the default job).
ALLREDUCE = {"aggregation": "allreduce"}


def sim(algo: str, opts: dict[str, Any], **over: Any) -> Any:
    opts = {**ALLREDUCE, **opts} if algo == "olco3" else opts
    return simulate(prepare(tiny(algo=algo, algo_options=opts, **over)))


def close(a: Any, b: Any) -> None:
    torch.testing.assert_close(a.bank.X, b.bank.X, rtol=1e-5, atol=1e-6)


MOMENTUM = {"momentum": 0.9, "lr": 0.1}
NO_COMP = {"staleness_compensation": False, "compression_compensation": False}


def test_s0_without_compression_is_local_sgd() -> None:
    # 14 steps, p = 4: the last round is a short one in both
    a = sim("localsgd", {"p": 4}, steps=14, train=MOMENTUM, split="shards")
    b = sim("olco3", {"p": 4, "s": 0, "compressor": "identity"}, steps=14, train=MOMENTUM,
            split="shards")
    close(a, b)


@pytest.mark.parametrize("compressor,aggregation", [("topk:ratio=0.25", "allreduce"),
                                                    ("sign", "ps"),
                                                    ("powersgd:rank=1", "allreduce")])
def test_s0_with_error_feedback_and_no_cc_is_qsparse(compressor: str, aggregation: str) -> None:
    opts = {"p": 3, "compressor": compressor, "aggregation": aggregation}
    a = sim("qsparse", opts, train=MOMENTUM)
    b = sim("olco3", {**opts, "s": 0, "compression_compensation": False}, train=MOMENTUM)
    close(a, b)
    assert a.result["final"]["payload_bytes"] == b.result["final"]["payload_bytes"] > 0


@pytest.mark.parametrize("s", [1, 3])
def test_p1_without_compensation_is_pipe_sgd(s: int) -> None:
    a = sim("pipesgd", {"s": s})
    b = sim("olco3", {"p": 1, "s": s, "compressor": "identity", **NO_COMP})
    close(a, b)
    # and the staleness really matters: s = 0 is a different trajectory
    c = sim("pipesgd", {"s": 0})
    assert not torch.allclose(a.bank.X, c.bank.X, atol=1e-4)


def test_s1_without_compression_with_sc_only_is_cocod() -> None:
    a = sim("cocod", {"p": 3}, steps=14, train=MOMENTUM)
    b = sim("olco3", {"p": 3, "s": 1, "compressor": "identity",
                      "compression_compensation": False}, steps=14, train=MOMENTUM)
    close(a, b)


def delay_free_gap(out: Any, prep: Any) -> float:
    """max |mean of the models - (x0 - sum_k mean_i u_i^k)|."""
    torch.manual_seed(prep.cfg.seed)
    x0, _ = flat_params(prep.spec.model_fn())
    u = torch.stack([w.state["update_sum"] for w in out.workers]).mean(0)
    return float((out.bank.X.mean(0) - (x0 - u)).abs().max())


@pytest.mark.parametrize("compressor", ["topk:ratio=0.1", "powersgd:rank=1"])
@pytest.mark.parametrize("s", [0, 1, 3])
def test_mean_model_is_the_delay_free_trajectory(compressor: str, s: int) -> None:
    for drain in (True, False):
        prep = prepare(tiny(algo="olco3", steps=13, train=MOMENTUM, split="shards",
                            algo_options={"p": 2, "s": s, "compressor": compressor,
                                          "drain": drain, **ALLREDUCE}))
        out = simulate(prep)
        assert delay_free_gap(out, prep) < 1e-6
        assert out.result["final"]["ef_residual_norm_mean"] > 0  # compression did bite
    # either compensation alone breaks it (so the check above can fail); without a drain,
    # since after one nothing is in flight any more
    for off in ("staleness_compensation", "compression_compensation"):
        if s == 0 and off == "staleness_compensation":
            continue  # nothing is in flight at s = 0: SC has no effect
        prep = prepare(tiny(algo="olco3", steps=13, train=MOMENTUM, split="shards",
                            algo_options={"p": 2, "s": s, "compressor": compressor,
                                          off: False, "drain": False, **ALLREDUCE}))
        assert delay_free_gap(simulate(prep), prep) > 1e-4


def expected_stall(rounds: int, round_s: float, lat_s: float, tx_s: float, s: int) -> float:
    """Stall of one worker when aggregations are in flight together (their latencies
    overlap, their transmissions tx_s queue on the links), started at round ends; the
    aggregate of round k is needed at the end of round k + s."""
    t, link_free, stall, flight = 0.0, 0.0, 0.0, deque()
    for _ in range(rounds):
        t += round_s
        link_free = max(t, link_free) + tx_s
        flight.append(link_free + lat_s)
        if len(flight) > s:
            need = flight.popleft()
            stall += max(0.0, need - t)
            t = max(t, need)
    return stall


@pytest.mark.parametrize("latency,s", [(0.002, 1), (0.002, 3), (0.002, 0), (0.004, 1),
                                       (0.004, 2), (0.01, 2)])
def test_stall_is_zero_exactly_when_the_network_delivers_within_s_rounds(
        latency: float, s: int) -> None:
    n, p, step, rounds = 4, 3, 0.01, 6
    out = sim("olco3", {"p": p, "s": s, "compressor": "topk:k=4", "drain": False},
              steps=p * rounds, network="custom",
              network_options={"latency_s": latency, "bandwidth_Bps": 1e9})
    net = make_network_config("custom", latency_s=latency, bandwidth_Bps=1e9)
    lat_s, tx_s = allgather_cost(net, n, [8 * 4] * n)  # top-4: values + indices
    want = expected_stall(rounds, p * step, lat_s, tx_s, s)
    assert out.result["final"]["stall_time_s_mean"] == pytest.approx(want, abs=1e-9)
    # s rounds of staleness hide an aggregation up to s rounds long (several in flight)
    assert (want == 0.0) == (lat_s + tx_s <= s * p * step)
    if s >= 1:
        assert out.result["final"]["staleness_mean"] == s * p


def test_drain_waits_and_every_worker_ends_on_the_shared_model() -> None:
    out = sim("olco3", {"p": 2, "s": 2, "compressor": "topk:ratio=0.2",
                        "compression_compensation": False}, steps=12)
    X = out.bank.X
    assert all(torch.equal(X[0], X[r]) for r in range(1, X.shape[0]))
    assert out.result["final"]["stall_time_s_mean"] > 0  # the drain waited


def test_ps_mode_costs_a_real_server_and_keeps_its_state_there() -> None:
    n, steps, p = 4, 12, 3
    out = sim("olco3", {"p": p, "s": 1, "compressor": "topk:k=5", "aggregation": "ps",
                        "server_compressor": "topk:k=7", "compression_compensation": False},
              steps=steps)
    rounds = steps // p
    assert out.result["final"]["payload_bytes"] == rounds * n * 8 * 5
    assert out.engine.server_bytes == rounds * n * 8 * 7
    X = out.bank.X  # drained, no CC: every worker holds the server's model
    assert all(torch.equal(X[0], X[r]) for r in range(1, n))
    assert out.engine.server_state["round"] == rounds
    assert float(out.engine.server_state["ef"]["residual"].norm()) > 0
    assert all("server" not in w.state["agg"] for w in out.workers)  # it is the server's


def test_config_errors_are_one_line() -> None:
    for bad in ({"p": 0}, {"s": -1}, {"compressor": "nope"}, {"aggregation": "mesh"},
                {"server_compressor": "sign"}, {"compressor": "topk:ratio=2"}):
        with pytest.raises(ConfigError) as e:
            OLCO3Config(**{**ALLREDUCE, **bad})
        assert "\n" not in str(e.value)
    # ef(...) in the spec turns error feedback on
    assert make_aggregator("olco3", OLCO3Config(compressor="ef(sign)", error_feedback=False),
                           0).ef


# -- an independent reference of the whole algorithm, with real gradient steps ---------------


def olco3_reference(ref: Reference, comp: Any, p: int, s: int, sc: bool, cc: bool,
                    ps: bool, rounds: int, server_comp: bool = False) -> list[torch.Tensor]:
    """OLCO3 in a few plain lines: p local steps, worker error feedback, (ps:) a server
    that compresses the mean with its own error feedback, the aggregate of round k applied
    at the end of round k + s, start model xg - SC * own messages in flight - CC * e_i
    (- the server's residual of the applied round, with server compensation); drained."""
    n = ref.n
    X = [ref.x0.clone() for _ in range(n)]
    xg, E = ref.x0.clone(), torch.zeros_like(ref.x0)
    e = [torch.zeros_like(ref.x0) for _ in range(n)]
    flight: list[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]] = []
    E_applied = torch.zeros_like(ref.x0)

    def start(i: int) -> torch.Tensor:
        x = xg - (E_applied if server_comp else 0) - (cc * e[i])
        for own, _, _ in flight:
            x = x - sc * own[i]
        return x

    for k in range(rounds + s):
        if k < rounds:
            Y = ref.local(X, p)
            msgs = []
            for i in range(n):
                v = (X[i] - Y[i]) + e[i]
                msgs.append(comp(v))
                e[i] = v - msgs[i]
            agg = mean(msgs)
            if ps:
                sv = agg + E
                agg = comp(sv)
                E = sv - agg
            flight.append((msgs, agg, E.clone()))
        if len(flight) > s or k >= rounds:
            _, agg, E_k = flight.pop(0)
            xg = xg - agg
            E_applied = E_k
        X = [start(i) for i in range(n)]
    return X


PS_CASES = [(c, s, sc, cc) for c in ("topk:ratio=0.25", "sign") for s in (0, 1, 2)
            for sc, cc in ((True, False), (False, True), (True, True))
            if not (s == 0 and (sc, cc) == (True, False))]


@pytest.mark.parametrize("comp,s,sc,cc", PS_CASES)
def test_ps_mode_matches_an_independent_reference(comp: str, s: int, sc: bool,
                                                  cc: bool) -> None:
    p, rounds = 2, 5
    ref = Reference("olco3", steps=p * rounds, split="shards", algo_options={
        "p": p, "s": s, "compressor": comp, "aggregation": "ps",
        "staleness_compensation": sc, "compression_compensation": cc})
    X = olco3_reference(ref, COMPRESSORS[comp], p, s, sc, cc, ps=True, rounds=rounds)
    out = ref.check(X)
    srv = out.engine.server_state["ef"]["residual"]
    assert float(srv.norm()) > 1e-3  # the server's compression did bite


@pytest.mark.parametrize("s,sc,cc", [(1, True, False), (2, True, False), (2, True, True),
                                     (1, False, True)])
def test_allreduce_mode_with_topk_matches_the_reference(s: int, sc: bool, cc: bool) -> None:
    """Staleness (and compression) compensation with a real compressor."""
    p, rounds = 2, 5
    ref = Reference("olco3", steps=p * rounds, split="shards", algo_options={
        "p": p, "s": s, "compressor": "topk:ratio=0.25", "aggregation": "allreduce",
        "staleness_compensation": sc, "compression_compensation": cc})
    X = olco3_reference(ref, COMPRESSORS["topk:ratio=0.25"], p, s, sc, cc, ps=False,
                        rounds=rounds)
    ref.check(X)


def _ps(opts: dict[str, Any], steps: int = 13,
        residuals: list[torch.Tensor] | None = None) -> tuple[Any, Any]:
    """A ps-mode run; ``residuals`` receives the server's residual after every round."""
    prep = prepare(tiny(algo="olco3", steps=steps, train=MOMENTUM, split="shards",
                        algo_options={"p": 2, "compressor": "topk:ratio=0.1",
                                      "aggregation": "ps", **opts}))
    if residuals is not None:
        ps = prep.algo.server()
        serve = ps.serve

        def recording(state: dict[str, Any], payloads: list[Any]) -> Any:
            reply = serve(state, payloads)
            residuals.append(ps.residual(state).clone())
            return reply

        ps.serve = recording
    return prep, simulate(prep)


@pytest.mark.parametrize("s", [0, 1, 2])
@pytest.mark.parametrize("drain", [True, False])
def test_ps_mean_model_is_the_delay_free_trajectory_plus_the_servers_residual(
        s: int, drain: bool) -> None:
    history: list[torch.Tensor] = []
    prep, out = _ps({"s": s, "drain": drain}, residuals=history)
    torch.manual_seed(prep.cfg.seed)
    x0, _ = flat_params(prep.spec.model_fn())
    u = torch.stack([w.state["update_sum"] for w in out.workers]).mean(0)
    assert len(history) == 7  # 13 steps, p = 2
    # E^(k-s): of the last applied round (after the drain: the server's latest residual)
    E = history[-1] if drain else history[-1 - s]
    assert float(E.norm()) > 1e-3
    gap = out.bank.X.mean(0) - (x0 - u)
    torch.testing.assert_close(gap, E, rtol=0, atol=2e-6)
    torch.testing.assert_close(history[-1], out.engine.server_state["ef"]["residual"])
    # the workers never receive E without server compensation
    assert float(out.workers[0].state["server_residual"].norm()) == 0
    # with server compensation the gap closes, and the models are identity-server's
    prep, comp = _ps({"s": s, "drain": drain, "server_compensation": True})
    assert delay_free_gap(comp, prep) < 2e-6
    _, ident = _ps({"s": s, "drain": drain, "server_compressor": "identity"})
    torch.testing.assert_close(comp.bank.X, ident.bank.X, rtol=1e-5, atol=2e-6)


def test_server_compensation_bills_the_residual_on_the_downlink() -> None:
    n, steps, p = 4, 12, 3
    opts = {"p": p, "s": 1, "compressor": "topk:k=5", "aggregation": "ps"}
    a = sim("olco3", opts, steps=steps)
    b = sim("olco3", {**opts, "server_compensation": True}, steps=steps)
    d = a.bank.d
    rounds = steps // p
    assert a.engine.server_bytes == rounds * n * 8 * 5
    assert b.engine.server_bytes == rounds * n * (8 * 5 + 4 * d)
    for bad in ({"server_compensation": True, "aggregation": "allreduce"},
                {"server_compensation": True, "aggregation": "ps",
                 "server_error_feedback": False}):
        with pytest.raises(ConfigError, match="server_compensation"):
            OLCO3Config(**bad)


@pytest.mark.parametrize("s", [1, 2])
def test_ps_mode_with_server_compensation_matches_the_reference(s: int) -> None:
    p, rounds, comp = 2, 5, "topk:ratio=0.25"
    ref = Reference("olco3", steps=p * rounds, split="shards", algo_options={
        "p": p, "s": s, "compressor": comp, "aggregation": "ps", "server_compensation": True})
    X = olco3_reference(ref, COMPRESSORS[comp], p, s, True, True, ps=True, rounds=rounds,
                        server_comp=True)
    ref.check(X)


def test_runs_report_the_workers_own_models_and_the_shared_model() -> None:
    """Issue 9: no claim may rest on the mean model alone, which nobody holds."""
    out = sim("olco3", {"p": 2, "s": 2, "compressor": "topk:ratio=0.1", "aggregation": "ps",
                        "drain": False}, steps=12, split="shards")
    spec, f = out.bank.spec, out.result["final"]
    x, y = spec.data.x_test, spec.data.y_test
    model = spec.model_fn()
    own = [evaluate(spec, model, out.bank.X[k], {}, x, y) for k in range(4)]
    assert f["accuracy_workers_mean"] == pytest.approx(sum(a for _, a in own) / 4)
    assert f["loss_workers_mean"] == pytest.approx(sum(lo for lo, _ in own) / 4)
    lg, ag = evaluate(spec, model, out.workers[0].state["xg"], {}, x, y)
    assert (f["loss_shared_model"], f["accuracy_shared_model"]) == pytest.approx((lg, ag))
    assert len({round(lo, 6) for lo, _ in own} | {round(f["loss_mean_model"], 6)}) == 5
    assert out.rows[-1]["accuracy_workers_mean"] == f["accuracy_workers_mean"]
    # an algorithm without a shared model has no such column; identical workers = worker 0
    ar = sim("localsgd", {"p": 3}, steps=12)
    assert "accuracy_shared_model" not in ar.result["final"]
    assert ar.result["final"]["accuracy_workers_mean"] == ar.result["final"]["accuracy_worker0"]
