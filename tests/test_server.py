"""The parameter server of ``aggregation: ps`` in the simulator: the same models as the
replicated-server emulation (pskit), and what a round trip costs (hand-computed)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pskit import emulated
from relaxsgd.algorithms.base import Algorithm, Compute, Now, ServerRound
from relaxsgd.algorithms.server import ParameterServer, server_seconds
from relaxsgd.compress.spec import make_compressor
from relaxsgd.run import prepare, simulate
from simkit import tiny

# Local steps one worker at a time: the server's replies reach the workers one after
# another, the emulation's all at once, and vmapped groups of other sizes round otherwise.
LOOP = {"batching": "loop", "split": "shards", "network": "wan",
        "train": {"batch_size": 8, "lr": 0.1, "momentum": 0.9}}
CASES = [("olco3", {"p": 2, "s": s, "compressor": "topk:ratio=0.1", "aggregation": "ps",
                    "server_compressor": "topk:ratio=0.05"}) for s in (0, 1, 2)]
CASES.append(("efsgd", {"compressor": "topk:ratio=0.25", "aggregation": "ps",
                        "server_compressor": "qsgd:bits=2"}))  # random rounding


@pytest.mark.parametrize("algo,opts", CASES, ids=[f"{a}-s{o.get('s', '')}" for a, o in CASES])
def test_the_server_gives_the_models_of_the_replicated_emulation(algo: str,
                                                                 opts: dict[str, Any]) -> None:
    cfg = tiny(algo=algo, algo_options=opts, steps=14, **LOOP)
    real = simulate(prepare(cfg))
    emu = simulate(emulated(prepare(cfg)))
    assert torch.equal(real.bank.X, emu.bank.X)
    replica = emu.workers[0].state["agg"]["replica"]
    rounds = 14 if algo == "efsgd" else 7  # a round per step / per p = 2 steps
    assert real.engine.server_state["round"] == replica["round"] == rounds
    assert torch.equal(real.engine.server_state["ef"]["residual"],
                       replica["ef"]["residual"])
    assert float(replica["ef"]["residual"].norm()) > 1e-3  # the server's compression bit
    # one hop each way instead of two all-gathers of 2(n-1) latencies each
    assert real.result["final"]["stall_time_s_mean"] < emu.result["final"]["stall_time_s_mean"]


class _Echo(Algorithm):
    """Every worker computes, then uploads UP bytes; the server replies DOWN bytes."""

    name = "echo"

    def __init__(self, info: Any, up: int, down: int, times: dict[int, tuple]) -> None:
        super().__init__(None, info)
        self.up, self.down, self.times = up, down, times

    def server(self) -> Any:
        ident = make_compressor("identity")
        return ParameterServer(ident, ident, False, 0)

    def program(self, w: Any) -> Any:
        yield Compute(w.total_steps)
        t0 = yield Now()
        reply = yield ServerRound(w.params.clone() * (w.rank + 1), self.up, self.down)
        t1 = yield Now()
        self.times[w.rank] = (t0, t1, reply)


def _echo(up: int, down: int, **network: float) -> tuple[dict[int, tuple], Any, Any]:
    prep = prepare(tiny(network="custom", network_options=network))
    times: dict[int, tuple] = {}
    prep.algo = _Echo(prep.info, up, down, times)
    return times, simulate(prep), prep


def test_a_server_round_trip_is_two_latencies_plus_the_bytes_through_its_link() -> None:
    lat, bw, up, down, n = 0.1, 1000.0, 100, 50, 4
    times, out, prep = _echo(up, down, latency_s=lat, bandwidth_Bps=bw)
    c = server_seconds(n, out.bank.d)
    t0 = times[0][0]
    # worker 0 hosts the server (as in the runtime): its upload does not travel; the
    # others' leave at t0 (0.1 s on each worker's link) and arrive a latency later; the
    # server's link takes them in one after another: the last at t0 + L + (n - 1) B/bw
    received = t0 + lat + (n - 1) * up / bw
    assert times[0][1] == pytest.approx(received + c, abs=1e-12)  # 0's reply: no hop
    for r in range(1, n):  # then n - 1 replies out of its link, rank order, a latency each
        assert times[r][0] == t0
        assert times[r][1] == pytest.approx(received + c + r * down / bw + lat,
                                            abs=1e-12)
    assert times[n - 1][1] - t0 == pytest.approx(
        2 * lat + ((n - 1) * up + (n - 1) * down) / bw + c, abs=1e-12)
    # every worker got the mean of the uploads, (1/n) sum_r (r + 1) x_r
    want = sum((r + 1) * out.bank.X[r] for r in range(n)) / n
    assert all(torch.allclose(times[r][2], want) for r in range(n))
    assert times[0][2] is not times[1][2]  # a reply of its own
    # bytes as they are counted in the runtime: the uploads are the workers' (worker
    # 0's too), the replies the server's, n of them
    assert [p.bytes_sent for p in out.engine.procs] == [up] * n
    assert (out.engine.server_bytes, out.engine.server_messages) == (n * down, n)


def test_worker_1_pays_two_message_overheads_a_round_as_in_the_runtime() -> None:
    """With a per-message overhead OV: worker 1's upload leaves after OV + B/bw, and its
    reply is the first to leave the server (OV + B/bw): two overheads, not three."""
    lat, bw, ov, up, down, n = 0.1, 1000.0, 0.02, 100, 50, 4
    times, out, _ = _echo(up, down, latency_s=lat, bandwidth_Bps=bw, overhead_s=ov)
    t0, c = times[0][0], server_seconds(n, out.bank.d)
    received = t0 + ov + lat + (n - 1) * up / bw
    assert times[1][1] - t0 == pytest.approx(
        2 * ov + 2 * lat + (n - 1) * up / bw + down / bw + c, abs=1e-12)
    assert times[n - 1][1] == pytest.approx(received + c + (n - 1) * (ov + down / bw) + lat,
                                            abs=1e-12)
    assert times[0][1] == pytest.approx(received + c, abs=1e-12)


def test_the_server_link_can_be_set_apart_from_the_workers() -> None:
    lat, bw, slat, sbw, up, down, n = 0.1, 1000.0, 0.05, 4000.0, 100, 50, 4
    times, out, _ = _echo(up, down, latency_s=lat, bandwidth_Bps=bw, server_latency_s=slat,
                          server_bandwidth_Bps=sbw)
    t0, c = times[0][0], server_seconds(n, out.bank.d)
    # each upload (workers 1..3) leaves its worker's link at t0 + B/bw and arrives slat
    # later; the server's link then takes one upload at a time, B/sbw each
    received = t0 + up / bw + slat + (n - 2) * up / sbw
    assert times[n - 1][1] == pytest.approx(received + c + (n - 1) * down / sbw + slat,
                                            abs=1e-12)
    assert out.result["network_model"]["server"] == {"latency_s": slat, "bandwidth_Bps": sbw}


class _Wire:
    """A stand-in for the transport: records what the server host sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, tuple]] = []
        self.on_dead: list[Any] = []
        self.dead: dict[int, str] = {}

    def send(self, peer: int, msg: tuple, done: Any = None) -> int:
        self.sent.append((peer, msg))
        return 0


def test_the_dist_server_host_serves_a_round_and_refuses_what_breaks_its_rules() -> None:
    """Rank 0's host (relaxsgd.distributed.server): a round is served when its n uploads
    are in; an upload of another round, a second one, or one not of the workers' form (a
    hostile size that would allocate) is refused before it is kept."""
    from relaxsgd.algorithms.server import MAX_ROUNDS_AHEAD
    from relaxsgd.compress.topk import SparsePayload
    from relaxsgd.distributed.collectives import Counts, DHandle
    from relaxsgd.distributed.server import ServerHost
    from relaxsgd.distributed.wire import WireError

    d, n = 20, 3
    topk = make_compressor("topk:k=4")
    host = ServerHost(ParameterServer(topk, topk, True, 0), d, None, n, _Wire(), Counts())
    msgs = [topk.compress(torch.randn(d), {}, None)[0] for _ in range(n)]
    mine = DHandle("rank 0")
    host.upload(0, 0, msgs[0], 32.0, local=mine)
    assert host.on_message(1, ("msg", ("ps", 0), (msgs[1], 32.0)))
    assert not mine.done and not host.tr.sent
    # a later round's upload is kept (rounds are pipelined), one too far ahead is not
    later = [topk.compress(torch.randn(d), {}, None)[0] for _ in range(n)]
    host.on_message(2, ("msg", ("ps", 1), (later[2], 32.0)))
    host.on_message(1, ("msg", ("ps", 1), (later[1], 32.0)))
    with pytest.raises(WireError, match=f"round {MAX_ROUNDS_AHEAD} while the parameter server is "
                                        "at round 0"):
        host.on_message(2, ("msg", ("ps", MAX_ROUNDS_AHEAD), (msgs[2], 32.0)))
    later_mine = DHandle("rank 0, round 1")
    host.upload(0, 1, later[0], 32.0, local=later_mine)  # round 1 complete: it waits
    assert not later_mine.done and not host.tr.sent and host.round == 0
    with pytest.raises(WireError, match="a second upload"):
        host.on_message(1, ("msg", ("ps", 0), (msgs[1], 32.0)))
    huge = SparsePayload(msgs[2].values, msgs[2].indices, 1 << 40)
    with pytest.raises(WireError, match="not of the form of the workers' SparsePayload"):
        host.on_message(2, ("msg", ("ps", 0), (huge, 32.0)))
    bad = SparsePayload(msgs[2].values, msgs[2].indices + 1000, d)
    with pytest.raises(WireError, match="does not decode"):
        host.on_message(2, ("msg", ("ps", 0), (bad, 32.0)))
    assert not host.on_message(2, ("msg", "other", 1))  # not an upload: not the server's
    host.on_message(2, ("msg", ("ps", 0), (msgs[2], 32.0)))
    # served: the reply that the simulator's server computes, to every worker
    ref = ParameterServer(topk, topk, True, 0)
    ref_state = ref.init_state(d)
    want = ref.serve(ref_state, msgs)
    assert mine.done and torch.equal(mine.value.values, want.values)
    # ... then round 1, complete before, served right after it, in order
    want1 = ref.serve(ref_state, later)
    assert [(p, m[1]) for p, m in host.tr.sent] == [(1, ("ps", 0)), (2, ("ps", 0)),
                                                    (1, ("ps", 1)), (2, ("ps", 1))]
    assert torch.equal(host.tr.sent[0][1][2].indices, want.indices)
    assert later_mine.done and torch.equal(later_mine.value.values, want1.values)
    assert host.round == 2 and host.counts.server_bytes == 6 * 32
    with pytest.raises(WireError, match="round 1 while the parameter server is at round 2"):
        host.on_message(2, ("msg", ("ps", 1), (later[2], 32.0)))  # served already

    # a worker lost before rank 0 uploads: rank 0's wait fails at once, naming it; and a
    # worker lost with rounds ahead uploaded fails rank 0's waits for every round it lacks
    host.upload(0, 3, msgs[0], 32.0, local=(ahead := DHandle("rank 0, round 3")))
    host.tr.dead[2] = "its connection closed"
    host.upload(1, 2, msgs[1], 32.0)
    late = DHandle("rank 0, round 2")
    host.upload(0, 2, msgs[0], 32.0, local=late)
    assert late.done and "lost worker 2, so the parameter server cannot complete round 2" \
        in str(late.error)
    assert ahead.done and "cannot complete round 3" in str(ahead.error)


def test_a_quorum_server_round_costs_what_a_full_round_does(tmp_path: Any) -> None:
    """Under churn (a trace whose only event comes after the run) every server round is a
    quorum round (.sim.churn); with every worker in, it must cost what a full round does:
    worker 0's reply takes no hop, and the server's own compression its codec time."""
    (tmp_path / "t.csv").write_text("worker,event,step\n1,leave,1000\n")
    # (s = 0: one round at a time in both, as quorum rounds always are; a full round's
    # pipelining is test_server_rounds_are_pipelined)
    opts = {"p": 2, "s": 0, "compressor": "topk:ratio=0.1", "aggregation": "ps",
            "server_compressor": "topk:ratio=0.05"}
    (tmp_path / "p.yaml").write_text("compute: {flops_per_s: 1.0e9, encode_s: 1.0e-6, "
                                     "decode_s: 2.0e-6}\n")
    comp = {"step_time_s": 0.01, "codec": "on", "profile": str(tmp_path / "p.yaml")}
    cfgs = [tiny(algo="olco3", algo_options=opts, steps=8, compute=comp,
                 network="custom", network_options={"latency_s": 0.05,
                                                    "bandwidth_Bps": 1e5}, **el)
            for el in ({}, {"elastic": {"churn": {"trace": str(tmp_path / "t.csv")}}})]
    full, quorum = (simulate(prepare(c)) for c in cfgs)
    assert quorum.engine.members is not None and not quorum.engine.members.events
    for key in ("virtual_time_s", "stall_time_s_mean"):
        assert quorum.result["final"][key] == pytest.approx(full.result["final"][key],
                                                            rel=1e-12), key
    assert (quorum.engine.server_bytes, quorum.engine.server_messages) == (
        full.engine.server_bytes, full.engine.server_messages)
    assert torch.equal(quorum.bank.X, full.bank.X)


def test_server_rounds_are_pipelined() -> None:
    """OLCO3 with s rounds of staleness uploads round k+1 before round k's reply: with a
    1 s latency and 10 ms steps, s = 2 keeps 3 rounds in flight and takes about a third
    of the time of s = 0 (one round trip a round); rounds one at a time (the FIFO chain
    this replaced) would take as long as s = 0. Served in order: the same models as the
    replicated emulation (test_the_server_gives_the_models_of_the_replicated_emulation)."""
    times = {}
    for s in (0, 2):
        cfg = tiny(algo="olco3", steps=12, evals=1, network="custom",
                   network_options={"latency_s": 1.0, "bandwidth_Bps": 1e9},
                   compute={"step_time_s": 0.01},
                   algo_options={"p": 1, "s": s, "aggregation": "ps",
                                 "compressor": "topk:ratio=0.1"})
        times[s] = simulate(prepare(cfg)).result["final"]["virtual_time_s"]
    # s = 0: 12 round trips of 2 s; s = 2: 12 rounds, 3 at a time (plus the drain)
    assert times[0] == pytest.approx(24.0, rel=0.02)
    assert times[2] == pytest.approx(8.0, rel=0.05)


def test_olco3s_staleness_through_a_server_is_bounded_by_what_the_server_keeps() -> None:
    """s + 1 rounds in flight through the server: s is checked against the rounds the
    server keeps (one line), not refused later by the host as an invalid upload."""
    from relaxsgd.algorithms.olco3 import OLCO3Config
    from relaxsgd.algorithms.server import MAX_ROUNDS_AHEAD
    from relaxsgd.errors import ConfigError

    OLCO3Config(s=MAX_ROUNDS_AHEAD - 1)
    with pytest.raises(ConfigError, match=f"in 0..{MAX_ROUNDS_AHEAD - 1}, got "
                                          f"{MAX_ROUNDS_AHEAD}"):
        OLCO3Config(s=MAX_ROUNDS_AHEAD)
    OLCO3Config(s=MAX_ROUNDS_AHEAD, aggregation="allreduce", compressor="powersgd:rank=2")



def test_the_server_computes_one_round_at_a_time(tmp_path: Any) -> None:
    """Pipelined rounds queue at the server: with its compression costly (0.1 ms an
    element) and steps and links nearly free, a round's server time dominates, so s = 3
    (4 rounds in flight) cannot take much less than the 12 rounds' server time, about
    0.6 of s = 0's time here; rounds computed side by side on the server would take 0.32."""
    (tmp_path / "p.yaml").write_text("compute: {flops_per_s: 1.0e12, encode_s: 1.0e-4, "
                                     "decode_s: 1.0e-4}\n")
    times = {}
    for s in (0, 3):
        cfg = tiny(algo="olco3", steps=12, evals=1, network="custom",
                   network_options={"latency_s": 0.001, "bandwidth_Bps": 1e9},
                   compute={"step_time_s": 0.001, "codec": "on",
                            "profile": str(tmp_path / "p.yaml")},
                   algo_options={"p": 1, "s": s, "aggregation": "ps",
                                 "compressor": "topk:ratio=0.1",
                                 "server_compressor": "qsgd:bits=2"})
        times[s] = simulate(prepare(cfg)).result["final"]["virtual_time_s"]
    assert 0.5 * times[0] < times[3] < times[0]
