"""The simulator's accounting, pinned by cases small enough to compute by hand.

Calibration is only as good as what it calibrates: which link each message occupies and
for how long (with the runtime's per-message overhead, retransmissions, a responder whose
link is busy), a step's duration under each heterogeneity model, the draws of the random
schedules (SwarmSGD's geometric local steps, its sequential edge stream), and the value of
the reported metrics (bytes, messages, bits per parameter, consensus distance).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any

import pytest
import torch

from relaxsgd.algorithms.base import Algorithm, Compute, Exchange, Now, Recv, Reply, Send, Wait
from relaxsgd.algorithms.swarm_state import sequential_plans
from relaxsgd.metrics import consensus_distance
from relaxsgd.run import prepare, simulate
from relaxsgd.sim.compute import ComputeConfig, ComputeModel
from relaxsgd.sim.network import Network, NetworkConfig
from simkit import tiny

STEP = 0.01  # compute.step_time_s in tiny()
L, BW, OV = 0.001, 1e6, 0.0005  # latency, bytes/s, overhead per message


@dataclasses.dataclass(frozen=True)
class _NoOptions:
    pass


def run_program(body: Any, handler: Any = None, **over: Any) -> Any:
    """Run ``body(self, w)`` as every worker's program (4 workers of tiny())."""

    class Probe(Algorithm):
        name = "probe"
        Config = _NoOptions

        def program(self, w: Any) -> Any:
            return body(self, w)

        def on_exchange(self, w: Any, src: int, payload: Any) -> Any:
            return handler(self, w, src, payload)

    prep = prepare(tiny(**over))
    prep.algo = Probe(_NoOptions(), prep.info)
    return simulate(prep)


NET = {"network": "custom", "network_options": {"latency_s": L, "bandwidth_Bps": BW,
                                                "overhead_s": OV}}


# -- links -------------------------------------------------------------------------------
def test_each_message_occupies_its_senders_link_then_takes_one_latency() -> None:
    """Worker 0 sends two 2000-byte messages to 1 at t=0, worker 2 one: each takes
    OV + 2 ms of its sender's link (0's two in a row), then L to arrive."""
    seen: dict[str, float] = {}
    x = torch.zeros(4)

    def body(self: Any, w: Any) -> Any:
        if w.rank == 0:
            a = yield Send(1, x, 2000, tag="a")
            b = yield Send(1, x, 2000, tag="b")
            yield Wait([a, b])
            seen["0 sent"] = yield Now()
        elif w.rank == 2:
            yield Send(1, x, 2000, tag="c", blocking=True)
            seen["2 sent"] = yield Now()
        elif w.rank == 1:
            for src, tag in ((0, "a"), (2, "c"), (0, "b")):
                yield Recv(src, tag)
                seen[tag] = yield Now()

    out = run_program(body, **NET)
    tx = OV + 2000 / BW
    assert seen["2 sent"] == pytest.approx(tx)  # its own link: not behind worker 0's
    assert seen["0 sent"] == pytest.approx(2 * tx)  # serialised on worker 0's link
    assert seen["a"] == pytest.approx(tx + L)
    assert seen["c"] == pytest.approx(tx + L)
    assert seen["b"] == pytest.approx(2 * tx + L)
    f = out.result["final"]
    assert f["bytes_sent_total"] == 6000 and f["messages_total"] == 3
    assert f["bytes_sent_per_worker_max"] == 4000


def test_an_exchange_reply_waits_for_the_responders_busy_link() -> None:
    """Worker 1 starts a 10 kB send to 2 at t=0 (its link busy until OV + 10 ms); worker
    0's 1 kB request arrives at OV + 1 ms + L and is answered at once, but the 1 kB reply
    leaves only after the send: OV + 10 ms, then OV + 1 ms on the link, then L."""
    seen: dict[str, float] = {}

    def body(self: Any, w: Any) -> Any:
        if w.rank == 0:
            got = yield Exchange(1, torch.ones(2), 1000)
            seen["reply"] = yield Now()
            seen["value"] = float(got.sum())
        elif w.rank == 1:
            yield Send(2, torch.zeros(2), 10_000, blocking=True)
        elif w.rank == 2:
            yield Recv(1)
            seen["send"] = yield Now()

    def handler(self: Any, w: Any, src: int, payload: Any) -> Reply:
        seen["asked"] = float(w.rank)
        return Reply(payload * 3, 1000)

    out = run_program(body, handler, **NET)
    assert seen["send"] == pytest.approx(OV + 10_000 / BW + L)
    assert seen["reply"] == pytest.approx((OV + 10_000 / BW) + (OV + 1000 / BW) + L)
    assert seen["value"] == 6.0 and seen["asked"] == 1.0
    assert out.result["final"]["bytes_sent_total"] == 12_000


def test_a_lost_transmission_is_resent_after_the_retransmission_timeout() -> None:
    """Loss: each lost try costs the link again and one timeout, max(0.2 s, 3 L)."""

    class Draws:  # the loss draws: lost, lost, delivered
        def __init__(self) -> None:
            self.seq = iter([0.1, 0.2, 0.9])

        def random(self) -> float:
            return next(self.seq)

    for lat, rto in ((0.01, 0.2), (0.1, 0.3)):
        net = Network(NetworkConfig(lat, 1e6, loss=0.5, overhead_s=OV), 2, seed=0)
        net.rng = Draws()  # type: ignore[assignment]
        net.link_free[0] = 1.0  # still busy with an earlier message
        left, arrive, tries = net.p2p(0, 5000, 0.5)
        assert tries == 3
        assert left == pytest.approx(1.0 + OV + 3 * 0.005)
        assert arrive == pytest.approx(left + 2 * rto + lat)
        assert net.link_free == [pytest.approx(left), 0.0, 0.0]  # only the sender's link


def test_a_lossy_message_counts_every_transmission_as_bytes_sent() -> None:
    def body(self: Any, w: Any) -> Any:
        if w.rank == 0:
            yield Send(1, torch.zeros(2), 1000, blocking=True)
        elif w.rank == 1:
            yield Recv(0)

    out = run_program(body, network="custom",
                      network_options={"latency_s": L, "bandwidth_Bps": BW, "loss": 0.9})
    f = out.result["final"]
    tries = f["messages_total"]
    assert tries >= 1 and f["bytes_sent_total"] == 1000 * tries


def test_a_step_is_the_step_time_and_an_allreduce_step_its_gloo_cost() -> None:
    """All-reduce SGD, 4 workers, 12 steps, logreg of d = 8 x 4 + 4 = 36 parameters on the
    cloud profile (250 us, 2 Gbit/s): every number of result.json by hand."""
    out = simulate(prepare(tiny(algo="allreduce", network="cloud")))
    f, n, d, steps = out.result["final"], 4, 36, 12
    per_step = 2 * (n - 1) / n * 4 * d  # bytes one worker sends in one all-reduce: 216
    assert f["bytes_sent_total"] == n * steps * per_step
    assert f["bytes_sent_per_worker_max"] == steps * per_step
    assert f["bytes_per_worker_per_step"] == pytest.approx(per_step)
    assert f["messages_total"] == n * steps * 2 * (n - 1)
    assert f["bits_per_param_per_step"] == pytest.approx(8 * per_step / d)  # 48 bits
    reduce_s = 4 * (n - 1) * 250e-6 + per_step / (2e9 / 8)  # gloo: 2 latencies a step
    assert f["virtual_time_s"] == pytest.approx(steps * (STEP + reduce_s), rel=1e-12)
    assert f["stall_time_s_mean"] == pytest.approx(steps * reduce_s, rel=1e-9)
    assert f["consensus_distance"] == pytest.approx(0.0, abs=1e-12)
    assert f["samples_total"] == n * steps * 8


# -- compute -----------------------------------------------------------------------------
def test_step_durations_under_each_heterogeneity_model() -> None:
    st = 0.01
    none = ComputeModel(ComputeConfig(), 3, seed=1, step_time_s=st)
    assert none.duration(2, 5) == pytest.approx(5 * st)
    fixed = ComputeModel(ComputeConfig(heterogeneity="fixed", speed_factors=(1.0, 3.0)), 3,
                         seed=1, step_time_s=st)
    assert [fixed.duration(r, 4) for r in range(3)] == pytest.approx([0.04, 0.12, 0.04])
    # stragglers: p = 0 and p = 1 are exact; in between, the mean slowdown 1 + (f - 1) p
    for p, want in ((0.0, 1.0), (1.0, 5.0)):
        m = ComputeModel(ComputeConfig(heterogeneity="stragglers", straggler_p=p,
                                       straggler_f=5.0), 2, seed=1, step_time_s=st)
        assert m.duration(1, 7) == pytest.approx(7 * st * want)
    m = ComputeModel(ComputeConfig(heterogeneity="stragglers", straggler_p=0.25,
                                   straggler_f=5.0), 2, seed=1, step_time_s=st)
    assert m.duration(0, 40_000) / (40_000 * st) == pytest.approx(2.0, rel=0.02)
    # drawn per step from the worker's own stream: chunks do not change the total
    a = ComputeModel(m.cfg, 2, seed=3, step_time_s=st)
    b = ComputeModel(m.cfg, 2, seed=3, step_time_s=st)
    b.duration(1, 50)  # another worker's draws do not move worker 0's
    assert a.duration(0, 3) + a.duration(0, 97) == pytest.approx(b.duration(0, 100))


def test_lognormal_factors_are_exp_of_sigma_times_a_normal_draw() -> None:
    def factors(sigma: float, n: int = 4000) -> list[float]:
        return ComputeModel(ComputeConfig(heterogeneity="lognormal", sigma=sigma), n,
                            seed=7, step_time_s=1.0).factors

    assert factors(0.0, 5) == [1.0] * 5
    half, one = factors(0.5), factors(1.0)
    assert [math.log(f) for f in one] == pytest.approx([2 * math.log(f) for f in half])
    logs = [math.log(f) for f in half]
    assert statistics.fmean(logs) == pytest.approx(0.0, abs=0.03)
    assert statistics.pstdev(logs) == pytest.approx(0.5, rel=0.05)
    m = ComputeModel(ComputeConfig(heterogeneity="lognormal", sigma=0.5), 3, seed=7,
                     step_time_s=0.01)
    assert m.duration(2, 6) == pytest.approx(6 * 0.01 * m.factors[2])


def test_the_engine_charges_each_worker_its_own_step_time() -> None:
    seen: dict[int, float] = {}

    def body(self: Any, w: Any) -> Any:
        yield Compute(3)
        seen[w.rank] = yield Now()

    run_program(body, compute={"step_time_s": STEP, "heterogeneity": "fixed",
                               "speed_factors": [1, 2, 4]})
    assert seen == pytest.approx({0: 0.03, 1: 0.06, 2: 0.12, 3: 0.03})


# -- random schedules ----------------------------------------------------------------------
def _swarm(**opts: Any) -> Any:
    prep = prepare(tiny(algo="swarm", algo_options={"quantizer": "none", **opts}))
    return prep.algo


class _W:
    def __init__(self) -> None:
        self.rng = torch.Generator().manual_seed(11)


@pytest.mark.parametrize("H", [1, 2, 4])
def test_swarms_geometric_local_steps_have_support_1_and_mean_h(H: int) -> None:
    algo, w = _swarm(H=H), _W()
    draws = [algo._draw_h(w, 10**9) for _ in range(20_000)]
    assert min(draws) == 1 and all(isinstance(h, int) for h in draws)
    assert statistics.fmean(draws) == pytest.approx(H, rel=0.03)
    assert draws.count(1) / len(draws) == pytest.approx(1 / H, abs=0.015)  # P(1) = 1/H
    assert max(algo._draw_h(w, 3) for _ in range(2000)) <= 3  # capped by what is left
    assert {_swarm(H=H, steps_dist="fixed")._draw_h(w, 10**9) for _ in range(50)} == {H}


def test_the_sequential_stream_draws_edges_uniformly_and_spends_every_budget() -> None:
    edges, n, total, H = [(0, 1), (1, 2), (2, 3), (0, 3)], 4, 3000, 4
    plans = sequential_plans(edges, n, total, seed=5, H=H, geometric=True)
    for r in range(n):
        assert sum(h for _, _, h, _ in plans[r]) == total  # exactly its budget
        assert all(h >= 0 for _, _, h, _ in plans[r])
    pairs = {}
    for r in range(n):
        for t, peer, _, init in plans[r]:
            pairs.setdefault(t, []).append((r, peer, init))
    for sides in pairs.values():  # each interaction: both ends, one initiator
        assert len(sides) == 2 and sides[0][1] == sides[1][0] and sides[0][0] == sides[1][1]
        assert sides[0][2] != sides[1][2]
    count = {e: 0 for e in edges}
    for sides in pairs.values():
        count[tuple(sorted(sides[0][:2]))] += 1
    assert max(count.values()) / min(count.values()) < 1.15  # uniform over the 4 edges
    steps = []  # the draws before a worker's last, capped one (then 0s: pure averaging)
    for r in range(n):
        done = 0
        for _, _, h, _ in plans[r]:
            if done + h >= total:
                break
            steps.append(h)
            done += h
    assert statistics.fmean(steps) == pytest.approx(H, rel=0.05) and min(steps) >= 1


# -- metrics -------------------------------------------------------------------------------
def test_consensus_distance_is_the_mean_squared_distance_to_the_mean() -> None:
    X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert consensus_distance(X) == pytest.approx(2.0)  # each is sqrt(2) from (1, 1)
    assert consensus_distance(torch.tensor([[1.0, 2.0], [3.0, 2.0]])) == pytest.approx(1.0)
    assert consensus_distance(torch.ones(1, 5)) == 0.0


def test_the_reported_consensus_distance_is_that_of_the_final_models() -> None:
    """SwarmSGD (gossip: the workers differ at the end): the reported consensus distance
    is recomputed from the final models, and the bytes from its messages: each
    unquantized interaction sends the whole model (4 d bytes) each way."""
    cfg = tiny(algo="swarm", algo_options={"quantizer": "none", "H": 2}, steps=12, evals=1)
    out = simulate(prepare(cfg))
    f = out.result["final"]
    assert f["consensus_distance"] > 0
    assert f["consensus_distance"] == pytest.approx(consensus_distance(out.bank.X), rel=1e-6)
    d, n = out.bank.d, 4
    # each side of an interaction counts 1/n: n/2 x the sum is the number of interactions
    inter = n / 2 * sum(w.counters.get("interactions_per_worker", 0.0) for w in out.workers)
    assert inter == pytest.approx(round(inter)) and inter >= 1
    assert f["messages_total"] == 2 * round(inter)  # a request and a reply each
    assert f["bytes_sent_total"] == 4 * d * f["messages_total"]


# -- codec time --------------------------------------------------------------------------
ENC, DEC = 1e-3, 2e-3  # seconds an element encoded / decoded (the profile file's)


def _codec_profile(tmp_path: Any) -> str:
    f = tmp_path / "codec.yaml"
    f.write_text(f"compute: {{flops_per_s: 1.0e9, encode_s: {ENC}, decode_s: {DEC}}}\n")
    return str(f)


def _codec_program(seen: dict[str, float]) -> tuple[Any, Any]:
    """0 lattice-encodes 10 values and exchanges them with 1, who decodes them and encodes
    its own 10 for the reply; 0 decodes the reply. 2 copies 1000 values (identity: no
    coding), top-k compresses 20 and sends them to 3, who decompresses them (20 values)."""
    from relaxsgd.compress.identity import Identity
    from relaxsgd.compress.topk import TopK
    from relaxsgd.quantize.lattice import LatticeQuantizer

    q, x = LatticeQuantizer(8), torch.linspace(-1, 1, 10)

    def body(self: Any, w: Any) -> Any:
        if w.rank == 0:
            payload, _ = q.encode_value(x, 0.01, w.rng)
            got = yield Exchange(1, payload, 100)
            q.decode(got, x)
            seen["0 decoded"] = yield Now()
        elif w.rank == 2:
            Identity().compress(torch.zeros(1000), {})
            payload, _ = TopK(k=2).compress(torch.arange(20.0), {})
            yield Send(3, payload, 200, blocking=True)
            seen["2 sent"] = yield Now()
        elif w.rank == 3:
            payload = yield Recv(2)
            seen["3 got"] = yield Now()
            TopK(k=2).decompress(payload)
            seen["3 decoded"] = yield Now()

    def handler(self: Any, w: Any, src: int, payload: Any) -> Reply:
        q.decode(payload, x)
        seen["1 answers"] = 1.0
        return Reply(q.encode_value(x, 0.01, w.rng)[0], 100)

    return body, handler


def run_codec_program(profile: str) -> dict[str, float]:
    """:func:`_codec_program` run with codec time charged from ``profile``, worker 2 at
    speed factor 2: the times it saw."""
    seen: dict[str, float] = {}
    body, handler = _codec_program(seen)
    run_program(body, handler, **NET, compute={
        "codec": "on", "profile": profile, "heterogeneity": "fixed",
        "speed_factors": [1, 1, 2, 1]})
    return seen


def codec_program_times(lat_e: float, lat_d: float, top_e: float,
                        top_d: float) -> dict[str, float]:
    """What :func:`run_codec_program` must see, by hand, for the lattice's and top-k's
    costs a value: 0's 10 lattice values encoded before its request leaves; 1's 10
    decoded + 10 encoded before its reply leaves; 0's 10 decoded after the reply; 2
    (speed factor 2) 20 compressed before its send; 3's 20 decompressed after the message
    arrives."""
    link = OV + 100 / BW
    request_in = 10 * lat_e + link + L
    reply_in = request_in + 10 * (lat_d + lat_e) + link + L
    sent = 2 * 20 * top_e + OV + 200 / BW
    return {"0 decoded": reply_in + 10 * lat_d, "2 sent": sent, "3 got": sent + L,
            "3 decoded": sent + L + 20 * top_d}


def test_codec_time_delays_what_follows_the_coding_on_each_side(tmp_path: Any) -> None:
    """Codec time from the profile (ENC, DEC a value, every codec), charged where the
    runtime pays it (:func:`codec_program_times`). The identity's copy costs nothing."""
    seen = run_codec_program(_codec_profile(tmp_path))
    for key, want in codec_program_times(ENC, DEC, ENC, DEC).items():
        assert seen[key] == pytest.approx(want), key


def test_a_fixed_step_time_charges_no_codec_time_unless_asked(tmp_path: Any) -> None:
    """codec: auto with a fixed step time (tiny's, the default job's kind): no codec time;
    the same profile's costs are charged only with codec: on."""
    seen: dict[str, float] = {}
    body, handler = _codec_program(seen)
    run_program(body, handler, **NET, compute={"profile": _codec_profile(tmp_path)})
    link = OV + 100 / BW
    assert seen["0 decoded"] == pytest.approx(2 * (link + L))
    assert seen["3 decoded"] == pytest.approx(OV + 200 / BW + L)
    assert ComputeConfig(step_time_s=None).charges_codec
    assert not ComputeConfig(step_time_s=0.05).charges_codec
    assert ComputeConfig(step_time_s=0.05, codec="on").charges_codec
    assert not ComputeConfig(step_time_s=None, codec="off").charges_codec
    assert tiny(compute={"codec": True}).compute.codec == "on"  # --set compute.codec=on


def test_powersgd_mean_meters_its_encode_before_and_its_decode_after_the_all_reduces() -> None:
    """PowerSGD's all-reduce protocol codes inside ``mean`` (no compress call): x's 12
    values encoded before the first all-reduce leaves, decoded after the last."""
    from relaxsgd.codec_meter import metering
    from relaxsgd.compress.powersgd import PowerSGD

    ps, x = PowerSGD(rank=1), torch.arange(12.0)
    state = ps.init_state(12, [("w", torch.Size([3, 4]))])
    prog = ps.mean(x, state)
    with metering() as work:
        eff = next(prog)
    assert (work.encoded, work.decoded) == (12, 0)
    with metering() as work:
        eff = prog.send(eff.tensors)
        with pytest.raises(StopIteration):
            prog.send(eff.tensors)
    assert (work.encoded, work.decoded) == (0, 12)
