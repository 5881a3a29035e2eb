"""The simulator's effect semantics, on small hand-written worker programs."""

from __future__ import annotations

import dataclasses
from collections import deque
from typing import Any

import pytest
import torch

from relaxsgd.algorithms.base import (
    Algorithm,
    AllReduce,
    Checkpoint,
    Compute,
    Deferred,
    Exchange,
    Now,
    Recv,
    Reply,
    Send,
    ServerRound,
    Sleep,
    Spawn,
    Wait,
)
from relaxsgd.errors import Deadlock
from relaxsgd.run import prepare, simulate
from simkit import tiny

STEP = 0.01  # compute.step_time_s in tiny()


@dataclasses.dataclass(frozen=True)
class _NoOptions:
    pass


class _GatherServer:
    """A parameter server whose reply is the list of the round's uploads, with a state."""

    def init_state(self, numel: int, layout: Any = None,
                   device: Any = None) -> dict[str, Any]:
        return {"round": 0}

    def serve(self, state: dict[str, Any], payloads: list[Any]) -> Any:
        state["round"] += 1
        return list(payloads)


def run_program(body: Any, handler: Any = None, server: Any = None, **over: Any) -> Any:
    """Run ``body(self, w)`` as every worker's program (``server``: the algorithm's
    parameter server); returns the SimOutcome."""

    class Probe(Algorithm):
        name = "probe"
        Config = _NoOptions

        def server(self) -> Any:
            return server

        def program(self, w: Any) -> Any:
            return body(self, w)

        def on_exchange(self, w: Any, src: int, payload: Any) -> Any:
            return handler(self, w, src, payload)

    prep = prepare(tiny(**over))
    prep.algo = Probe(_NoOptions(), prep.info)
    return simulate(prep)


def test_compute_takes_step_time_and_allreduce_its_gloo_cost() -> None:
    times: dict[int, list[float]] = {}

    def body(self: Any, w: Any) -> Any:
        yield Compute(w.total_steps)
        t0 = yield Now()
        m = yield AllReduce(torch.full((1000,), float(w.rank)))
        t1 = yield Now()
        times[w.rank] = [t0, t1, float(m[0])]

    out = run_program(body, network="custom",
                      network_options={"latency_s": 0.001, "bandwidth_Bps": 1e6})
    n, b = 4, 4000
    cost = 4 * (n - 1) * 0.001 + 2 * (n - 1) / n * b / 1e6  # gloo: two latencies a step
    for r in range(4):
        t0, t1, mean = times[r]
        assert t0 == pytest.approx(12 * STEP)
        assert t1 - t0 == pytest.approx(cost)
        assert mean == pytest.approx(1.5)
    assert out.result["final"]["bytes_sent_total"] == pytest.approx(4 * 2 * 3 / 4 * b, abs=4)
    assert out.result["final"]["stall_time_s_mean"] == pytest.approx(cost)


def test_nonblocking_allreduce_overlaps_compute_without_stall() -> None:
    seen = {}

    def body(self: Any, w: Any) -> Any:
        h = yield AllReduce(torch.ones(10), blocking=False)  # ~2 ms on this network
        yield Compute(w.total_steps)  # 120 ms: the reduce is long done
        v = yield Wait(h)
        seen[w.rank] = float(v.sum())

    out = run_program(body)
    assert seen == {r: 10.0 for r in range(4)}
    assert out.result["final"]["stall_time_s_mean"] == 0.0


def test_collectives_of_two_spawns_are_in_flight_together() -> None:
    """Two all-reduces issued at once (two spawns, as on two process groups) overlap
    their latencies but share the links: earlier than in sequence, not before the link."""
    ends: dict[str, float] = {}

    def reduce_once(w: Any) -> Any:
        yield AllReduce(torch.ones(25_000))  # 100 kB
        ends[f"w{w.rank}"] = yield Now()

    def body(self: Any, w: Any) -> Any:
        hs = []
        for _ in range(2):
            hs.append((yield Spawn(reduce_once(w))))
        yield Wait(hs)
        if w.rank == 0:
            ends["both"] = yield Now()
        yield Compute(w.total_steps)

    n, lat, bw, b = 4, 0.01, 1e6, 100_000
    run_program(body, network="custom",
                network_options={"latency_s": lat, "bandwidth_Bps": bw})
    one = 4 * (n - 1) * lat + 2 * (n - 1) / n * b / bw
    tx = 2 * (n - 1) / n * b / bw
    assert ends["both"] < 2 * one - 1e-6  # in sequence it would take 2 * one
    assert ends["both"] >= 2 * tx  # both transmissions crossed the same links
    assert ends["both"] == pytest.approx(one + tx)


def test_slow_worker_makes_others_stall_at_the_collective() -> None:
    def body(self: Any, w: Any) -> Any:
        yield Compute(w.total_steps)
        yield AllReduce(torch.ones(1))

    out = run_program(body, compute={"step_time_s": STEP, "heterogeneity": "fixed",
                                     "speed_factors": [1, 1, 1, 3]})
    stalls = [p.stall for p in out.engine.procs]
    reduce_time = stalls[3]  # the straggler only waits for the all-reduce itself
    assert 0 < reduce_time < 0.01
    for s in stalls[:3]:
        assert s == pytest.approx(2 * 12 * STEP + reduce_time)


def test_exchange_runs_the_partners_handler_and_defers_to_its_step_boundary() -> None:
    log: list[tuple[str, int, float]] = []

    def body(self: Any, w: Any) -> Any:
        if w.rank == 0:
            yield Sleep(0.005)  # worker 1 is in the middle of its compute now
            t = yield Now()
            ans = yield Exchange(1, "hello", nbytes=100)
            t2 = yield Now()
            log.append((ans, 0, t2 - t))
        yield Compute(w.total_steps)

    def handler(self: Any, w: Any, src: int, payload: Any) -> Any:
        return Deferred(lambda w: Reply(f"{payload} from {w.rank} at step {w.step}", 10))

    run_program(body, handler, network="custom",
                network_options={"latency_s": 0.0, "bandwidth_Bps": 1e9})
    ans, _, waited = log[0]
    assert ans == "hello from 1 at step 12"  # answered after its 12-step compute
    assert waited == pytest.approx(12 * STEP - 0.005, rel=1e-3)


def test_send_recv_spawn_and_allgather() -> None:
    got = {}

    def body(self: Any, w: Any) -> Any:
        peer = (w.rank + 1) % w.n
        yield Send(peer, w.rank * 10, nbytes=8, tag="x")

        def side() -> Any:
            msg = yield Recv((w.rank - 1) % w.n, tag="x")
            return msg + 1

        h = yield Spawn(side())
        yield Compute(w.total_steps)
        v = yield Wait(h)
        everyone = yield ServerRound(w.rank, nbytes=4, down_nbytes=16)
        got[w.rank] = (v, everyone)

    run_program(body, server=_GatherServer())
    for r in range(4):
        assert got[r] == (((r - 1) % 4) * 10 + 1, [0, 1, 2, 3])


def test_unreceived_messages_are_the_checkpoint_inbox_and_load_back() -> None:
    """Messages nobody received are what Engine.state_dict saves as a worker's inbox (the
    mailbox's dict, ``p.inbox``); loading it back refills the mailbox, counts included,
    and a Recv then takes the oldest first."""
    def body(self: Any, w: Any) -> Any:
        if w.rank == 0:
            for k in range(3):
                yield Send(1, f"m{k}", nbytes=8, tag="t")
        yield Compute(w.total_steps)
        if w.rank == 1:
            assert (yield Recv(0, tag="t")) == "m0"

    eng = run_program(body).engine
    state = eng.state_dict()
    assert eng.procs[1].inbox == {(0, "t"): deque(["m1", "m2"])}
    assert eng.procs[1].mail.held(0) == 2
    def idle(self: Any, w: Any) -> Any:
        yield Compute(w.total_steps)

    fresh = run_program(idle).engine
    assert fresh.procs[1].inbox == {}
    fresh.load_state_dict(state)
    p = fresh.procs[1]
    assert dict(p.inbox) == {(0, "t"): deque(["m1", "m2"])} and p.mail.held(0) == 2
    h = fresh._recv(p, Recv(0, tag="t"))
    assert h.done and h.value == "m1" and p.mail.held(0) == 1


def test_deadlock_is_reported_not_hung() -> None:
    def body(self: Any, w: Any) -> Any:
        yield Compute(w.total_steps)
        if w.rank != 2:
            yield AllReduce(torch.ones(1))

    with pytest.raises(Deadlock, match="never finished"):
        run_program(body)


def test_safe_points_that_are_not_a_consistent_cut_are_named() -> None:
    """Worker 1 places its safe points 3 steps off worker 0's: at a checkpoint worker 0
    parks while worker 1 waits for it in the all-reduce; reported, not hung."""
    def body(self: Any, w: Any) -> Any:
        while w.step < w.total_steps:
            yield Checkpoint(position=w.step + (3 if w.rank == 1 else 0))
            yield Compute(1)
            yield AllReduce(torch.ones(1))

    with pytest.raises(Deadlock, match="checkpoint never completed.*consistent cut"):
        run_program(body, steps=12, checkpoint_every=5)


def test_a_sub_program_running_at_a_checkpoint_is_named() -> None:
    """A spawn whose handle is not in w.state cannot be waited for nor saved."""
    def forever(w: Any) -> Any:
        yield Recv(w.rank, tag="never")

    def body(self: Any, w: Any) -> Any:
        yield Spawn(forever(w))
        while w.step < w.total_steps:
            yield Checkpoint()
            yield Compute(1)

    with pytest.raises(Deadlock, match="still run a sub-program"):
        run_program(body, steps=12, checkpoint_every=5)


def test_state_that_is_not_plain_data_is_refused_when_saving(tmp_path: Any) -> None:
    from relaxsgd.state_tree import UnsettledState

    def body(self: Any, w: Any) -> Any:
        w.state["thing"] = object()
        while w.step < w.total_steps:
            yield Checkpoint()
            yield Compute(1)

    class Probe(Algorithm):
        name = "probe"
        Config = _NoOptions
        resumable = True

        def program(self, w: Any) -> Any:
            return body(self, w)

    prep = prepare(tiny(steps=12, checkpoint_every=5))
    prep.algo = Probe(_NoOptions(), prep.info)
    with pytest.raises(UnsettledState, match=r"state\['thing'\]: a object is not plain data"):
        simulate(prep, str(tmp_path))
