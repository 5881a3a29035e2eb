"""The wire format (no pickle): every message the algorithms send round-trips; truncated,
garbled and hostile input raises a clean :class:`WireError` without allocating much; the
handshake and the credentials' error paths."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import socket
import struct
import subprocess
import sys
import threading
import tracemalloc
from typing import Any

import pytest
import torch

from distkit import GOSSIP, PING, PROBE, _Marker
from relaxsgd.algorithms import ALGORITHMS
from relaxsgd.algorithms.base import AllGather, Exchange, Reply, Send
from relaxsgd.config import from_dict
from relaxsgd.distributed import auth as A
from relaxsgd.distributed.transport import Transport
from relaxsgd.distributed.wire import KINDS, WireError, check_message, decode, encode
from relaxsgd.errors import ConfigError
from relaxsgd.run import prepare, simulate

BASE: dict[str, Any] = {
    "task": "logreg", "task_options": {"n_train": 240, "n_test": 50, "dim": 6, "classes": 3},
    "steps": 8, "evals": 1, "workers": 3, "train": {"batch_size": 8, "lr": 0.1},
}
EXTRA = [("swarm", {"quantizer": "lattice"}), ("swarm", {"quantizer": "qsgd"}),
         ("swarm", {"update": "pull"})] + [
    ("olco3", {"compressor": c}) for c in
    ("topk:ratio=0.25", "sign", "qsgd", "randk:ratio=0.25", "fp16", "powersgd:rank=1")]


def _bytes(msg: Any) -> bytearray:
    return bytearray(b"".join(bytes(f) for f in encode(msg)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(
            _same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(
            _same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _recorded_payloads(algo: str, opts: dict[str, Any]) -> list[tuple[str, Any]]:
    """Every payload of Send, Exchange, AllGather and Reply in a small simulated run."""
    prep = prepare(from_dict({**BASE, "algo": algo, "algo_options": opts,
                              "topology": "ring"}))
    seen: list[tuple[str, Any]] = []
    program, on_exchange = prep.algo.program, prep.algo.on_exchange

    def recording(w: Any) -> Any:
        gen = program(w)
        value, exc = None, None
        while True:
            try:
                eff = gen.throw(exc) if exc is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value
            if isinstance(eff, Send):
                seen.append(("msg", ("msg", eff.tag, eff.payload)))
            elif isinstance(eff, Exchange):
                seen.append(("xreq", ("xreq", 7, eff.payload)))
            elif isinstance(eff, AllGather):
                seen.append(("gather", (eff.payload, float(eff.nbytes))))
            try:
                value, exc = (yield eff), None
            except BaseException as e:  # noqa: BLE001 - handed back to the program
                exc = e

    def answering(w: Any, src: int, payload: Any) -> Any:
        ans = on_exchange(w, src, payload)
        if isinstance(ans, Reply):
            seen.append(("xrep", ("xrep", 7, ans.payload)))
        return ans

    prep.algo.program, prep.algo.on_exchange = recording, answering
    simulate(prep)
    return seen


CASES = [(a, {}) for a in ALGORITHMS.names()] + [c for c in EXTRA if c[0] in ALGORITHMS]


@pytest.mark.parametrize("algo, opts", CASES, ids=[f"{a}{o}" for a, o in CASES])
def test_every_message_an_algorithm_sends_round_trips(algo: str, opts: dict) -> None:
    seen = _recorded_payloads(algo, opts)
    for kind, msg in seen:
        got = decode(_bytes(msg))
        assert _same(msg, got), (algo, kind, msg, got)
        if kind != "gather":
            check_message(got)


def test_the_test_algorithms_and_runtime_messages_round_trip() -> None:
    assert {PROBE.name, PING.name, GOSSIP.name}
    snap = {"rank": 1, "indices": [0, 1], "final": False, "status": "", "step": 3,
            "samples": 24, "wall": 0.5, "params": torch.randn(7),
            "buffers": {"bn.running_mean": torch.zeros(3), "bn.num_batches": torch.tensor(4)},
            "loss": (1.5, 3), "counters": {"a": 1.0}, "obs_sum": {}, "obs_count": {},
            "bytes": 10.0, "messages": 2, "wire": 99.0, "server_bytes": 0.0,
            "server_messages": 0, "stall": 0.1, "compute_time": 0.2, "units": 3,
            "program_s": None, "initial": False}
    msgs = [("bye",), ("idle",), ("done",), ("abort", "worker 1: boom"), ("snap", snap),
            ("xreq", 3, {"mode": "pub"}), ("xrep", 3, torch.randn(2, 3).T),
            ("xerr", 3, "ValueError: x"), ("msg", ("x", 4), (torch.ones(2), 0.5)),
            ("status?", -4), ("status", -4, 10, 2, True),
            ("ckask", 15), ("ckq", 2), ("ckpos", 2, 10.0, False),
            ("ckgo", float("inf"), 0),
            ("qpart", 7, 0, [torch.ones(3)]), ("qres", 7, (0, 2), [torch.ones(3)]),
            ("qneed", 7), ("hask", 1), ("hand", 1, "runtime", {"coll_seq": 7}),
            ("hjoin", 2), ("sleave", 2), ("sback", 2),
            ("spart", 3, 1, ([torch.ones(2)], 8.0)),
            ("sres", 3, (0, 1), [torch.ones(2)]), ("sneed", 3),
            ("xrep", 1, [torch.zeros(0), torch.tensor(True), torch.arange(3).to(torch.int8),
                         torch.ones(2, dtype=torch.bfloat16), torch.Size([2, 3]),
                         torch.float16, b"\x00\xff", None, -(1 << 63), 1e308, "é"])]
    assert {m[0] for m in msgs} == set(KINDS)
    for m in msgs:
        got = check_message(decode(_bytes(m)))
        assert _same(tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in m),
                     got), m


@pytest.mark.parametrize("bad", [
    ("nope",), ("xreq", "3", 1), ("xreq", 3), ("status", 1, 2, 3, "yes"), ["done"],
    ("msg", [1], 2), "done", (), ("ckgo", "10", 0), ("ckpos", 1, 2.0, "no")])
def test_messages_outside_the_fixed_kinds_are_refused(bad: Any) -> None:
    with pytest.raises(WireError):
        check_message(decode(_bytes(bad)))


def test_objects_the_wire_does_not_carry_are_refused_when_sending() -> None:
    for obj in (object(), {1, 2}, torch.zeros(2).to_sparse(), 1 << 64,
                torch.zeros(2, dtype=torch.complex64), _Marker("/nonexistent")):
        with pytest.raises(WireError):
            encode(obj)


def test_a_pickle_is_not_a_message_and_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "pwned"
    for proto in range(2, pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(WireError):
            decode(bytearray(pickle.dumps(("msg", 0, _Marker(str(marker))), protocol=proto)))
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Marker(str(marker))))  # (the payload does work when unpickled)
    assert marker.exists()


def test_every_truncation_and_garbling_raises_a_clean_error() -> None:
    msg = ("xreq", 5, {"op": "avg", "data": torch.randn(20), "p": [1, 2.0, "s", b"b"],
                       "t": (None, True, torch.Size([2]), torch.int32)})
    good = _bytes(msg)
    for k in range(len(good)):
        with pytest.raises(WireError):
            decode(good[:k])
    with pytest.raises(WireError):
        decode(good + b"\x00")  # bytes after the last tensor
    rnd = random.Random(0)
    for _ in range(3000):
        bad = bytearray(good)
        for _ in range(rnd.randint(1, 4)):
            bad[rnd.randrange(len(bad))] = rnd.randrange(256)
        try:
            decode(bad)
        except WireError:
            pass  # anything else (IndexError, MemoryError, ...) fails the test
    for _ in range(2000):
        try:
            decode(bytearray(rnd.randbytes(rnd.randint(0, 64))))
        except WireError:
            pass


@pytest.mark.parametrize("body", [
    struct.pack("!I", 5) + b"l" + struct.pack("!I", 2**32 - 1),  # a huge count
    struct.pack("!I", 5) + b"s" + struct.pack("!I", 2**31),  # a huge string
    struct.pack("!I", 2**32 - 1) + b"N",  # a huge meta length
    struct.pack("!I", 19) + b"X\x00\x02" + struct.pack("!QQ", 2**31, 2**31),  # 2^62 floats
    struct.pack("!I", 11) + b"X\x00\x01" + struct.pack("!Q", 2**64 - 1),
    struct.pack("!I", 70) + b"l" + struct.pack("!I", 65) + b"l\x00\x00\x00\x01" * 13,
])
def test_hostile_lengths_are_refused_before_allocating(body: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(WireError):
            decode(bytearray(body))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_unknown_payload_classes_and_dtypes_are_refused() -> None:
    with pytest.raises(WireError, match="unknown payload class 'Popen'"):
        decode(bytearray(struct.pack("!I", 8) + b"C\x05Popen\x00"))
    with pytest.raises(WireError, match="unknown dtype code 200"):
        decode(bytearray(struct.pack("!I", 2) + b"Y\xc8"))


# -- the handshake ---------------------------------------------------------------------
def _pair(server_key: bytes, client_key: bytes, claim: int = 1,
          free: bool = True) -> tuple[Any, Any]:
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    res: dict[str, Any] = {}

    def serve() -> None:
        try:
            res["server"] = A.server_handshake(b, A.Auth(server_key), 0, 2, lambda r: free)
            b.sendall(b"\x01")
        except (A.HandshakeError, OSError) as e:
            res["server"] = e
            b.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        client: Any = A.client_handshake(a, A.Auth(client_key), claim, 0, 2)
    except A.HandshakeError as e:
        client = e
        a.close()  # as the transport does: the server sees the end of the connection
    t.join()
    a.close()
    return client, res["server"]


def test_the_handshake_proves_the_secret_both_ways() -> None:
    key = os.urandom(32)
    client, (rank, server_mac) = _pair(key, key)
    assert rank == 1 and client.key == server_mac.key  # the same session key on both sides
    assert client.fast == server_mac.fast == (A.Poly1305 is not None)
    client, server = _pair(key, os.urandom(32))
    assert isinstance(client, A.HandshakeError) and "did not prove" in str(client)
    assert "closed without a proof" in str(server)
    client, server = _pair(key, key, free=False)
    assert "already connected" in str(server) and isinstance(client, A.HandshakeError)


@pytest.mark.parametrize("fast", [False, True])
def test_a_frame_tag_depends_on_its_sequence_number_and_bytes(fast: bool) -> None:
    if fast and A.Poly1305 is None:
        pytest.skip("the cryptography package is not installed")
    mac = A.FrameMac(os.urandom(32), fast)
    assert mac.fast == fast and mac.size == (16 if fast else 32)
    tag = mac.tag(3, b"h" * 8, [b"body"])
    assert tag != mac.tag(4, b"h" * 8, [b"body"])  # replayed at another position
    assert tag != mac.tag(3, b"h" * 8, [b"bodz"])
    assert tag == mac.tag(3, b"h" * 8, [b"bo", memoryview(b"dy")])
    assert tag != A.FrameMac(os.urandom(32), fast).tag(3, b"h" * 8, [b"body"])


# -- credentials -----------------------------------------------------------------------
@pytest.mark.parametrize("env, hosts, match", [
    ({}, (), "no job secret: set RELAXSGD_SECRET"),
    ({"RELAXSGD_SECRET": "short"}, (), "use 16 or more"),
    ({"RELAXSGD_SECRET": "x" * 20, "RELAXSGD_SECRET_FILE": "/x"}, (), "keep one"),
    ({"RELAXSGD_SECRET_FILE": "/nonexistent/key"}, (), "cannot be read"),
    ({"RELAXSGD_INSECURE": "1"}, ("127.0.0.1", "192.0.2.7"), "loopback-only runs"),
    ({"RELAXSGD_SECRET": "x" * 20, "RELAXSGD_TLS_CERT": "/c.pem"}, (), "RELAXSGD_TLS_KEY"),
])
def test_missing_or_bad_credentials_are_one_clear_error(monkeypatch, env, hosts,
                                                        match) -> None:
    for k in ("RELAXSGD_SECRET", "RELAXSGD_SECRET_FILE", "RELAXSGD_INSECURE",
              "RELAXSGD_TLS_CERT", "RELAXSGD_TLS_KEY", "RELAXSGD_TLS_CA"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=match):
        A.from_env(hosts)


def test_insecure_mode_on_loopback_and_a_secret_file(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("RELAXSGD_SECRET", raising=False)
    monkeypatch.setenv("RELAXSGD_INSECURE", "1")
    assert A.from_env(("127.0.0.1",)).insecure
    monkeypatch.delenv("RELAXSGD_INSECURE")
    (tmp_path / "key").write_text("0123456789abcdef0123\n")
    monkeypatch.setenv("RELAXSGD_SECRET_FILE", str(tmp_path / "key"))
    assert A.from_env().key == b"0123456789abcdef0123"


def test_a_worker_without_a_secret_stops_with_one_line_before_connecting(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAXSGD_")}
    env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    p = subprocess.run([sys.executable, "-m", "relaxsgd.cli", "run", "--algo", "allreduce",
                        "--task", "logreg", "--workers", "1", "--steps", "2", "--runtime",
                        "dist", "--out", str(tmp_path), "-q"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("relaxsgd: error: no job secret: set RELAXSGD_SECRET")
    assert len(p.stderr.strip().splitlines()) == 1


# -- snapshots to rank 0 ---------------------------------------------------------------
def test_rank_0_accepts_only_well_formed_snapshots_of_the_sender_itself() -> None:
    from relaxsgd.distributed.evaluation import SnapshotSpec

    spec = SnapshotSpec(2, (torch.Size([7]), torch.float32),
                        {"bn.running_mean": (torch.Size([3]), torch.float32)}, 4)
    good = {"rank": 1, "indices": [0, 1], "final": False, "status": "", "step": 3,
            "samples": 24, "wall": 0.5, "params": torch.randn(7),
            "buffers": {"bn.running_mean": torch.zeros(3)}, "loss": (1.5, 3),
            "counters": {"a": 1.0}, "obs_sum": {}, "obs_count": {}, "bytes": 10.0,
            "messages": 2, "wire": 99.0, "server_bytes": 0.0, "server_messages": 0,
            "stall": 0.1, "compute_time": 0.2, "units": 3, "program_s": None,
            "initial": False}
    assert spec.check(dict(good), 1) is not None
    marked = {**good, "params": torch.zeros(0), "buffers": {}, "initial": True}
    assert spec.check(dict(marked), 1) is not None  # the initial model, filled by rank 0
    bad = [({}, 1), (good, 0),  # another worker's snapshot
           ({**good, "params": torch.randn(8)}, 1),
           ({**good, "params": torch.randn(7).double()}, 1),
           ({**good, "buffers": {}}, 1), ({**good, "indices": [5]}, 1),
           ({**good, "indices": [0] * 9}, 1), ({**good, "loss": (1.0,)}, 1),
           ({**good, "counters": {1: 2.0}}, 1), ({**good, "step": "3"}, 1),
           ({**good, "extra": 1}, 1), ({**good, "initial": 1}, 1),
           ({**marked, "params": torch.zeros(1)}, 1),  # the marker carries no parameters
           ({**marked, "params": torch.zeros(0).double()}, 1),
           ({**marked, "buffers": {"bn.running_mean": torch.zeros(3)}}, 1),
           ({**good, "buffers": {}, "initial": False}, 1)]
    for snap, src in bad:
        with pytest.raises(WireError):
            spec.check(snap, src)


def test_a_snapshot_of_the_initial_model_travels_without_it_and_rank_0_fills_it_in(
) -> None:
    from types import SimpleNamespace

    from relaxsgd.distributed.evaluation import InitialModel, Snapshotter

    x0, b0 = torch.randn(7), {"bn.running_mean": torch.randn(3)}
    initial = InitialModel(x0, b0)
    w = SimpleNamespace(rank=1, step=0, params=x0.clone(), counters={}, obs_sum={},
                        obs_count={})
    bank = SimpleNamespace(loss_count=[0], samples=[0], take_train_loss=lambda: 0.0,
                           buffers_of=lambda k: {n: v.clone() for n, v in b0.items()})
    counts = SimpleNamespace(bytes=0.0, messages=0, wire=0.0, server_bytes=0.0,
                             server_messages=0)
    ex = SimpleNamespace(counts=counts, lock=threading.Lock(), now=lambda: 0.0, stall=0.0,
                         tr=SimpleNamespace(wire_bytes=0))
    sent: list[dict] = []
    snapper = Snapshotter(w, bank, ex, 10, 2, sent.append, initial)
    snapper.maybe()  # step 0, the initial model: no tensors
    assert sent[-1]["initial"] and sent[-1]["params"].numel() == 0
    assert sent[-1]["buffers"] == {}
    filled = initial.fill(dict(sent[-1]))
    assert torch.equal(filled["params"], x0) and torch.equal(
        filled["buffers"]["bn.running_mean"], b0["bn.running_mean"])
    # one value changed (or a buffer): the whole model goes
    for change in ("params", "buffer"):
        snapper = Snapshotter(w, bank, ex, 10, 2, sent.append, initial)
        if change == "params":
            w.params[3] += 1e-6
        else:
            bank.buffers_of = lambda k: {"bn.running_mean": b0["bn.running_mean"] + 1}
        snapper.maybe()
        assert not sent[-1]["initial"] and sent[-1]["params"].numel() == 7
        assert set(sent[-1]["buffers"]) == {"bn.running_mean"}
        w.params.copy_(x0)
        bank.buffers_of = lambda k: {n: v.clone() for n, v in b0.items()}
    # past the start the copy is let go (and never compared again)
    w.step = 5
    snapper.maybe()
    assert snapper.initial is None
    # the snapshot of the last step is held back and goes just before the final one
    held: list[dict] = []
    sent.clear()
    snapper = Snapshotter(w, bank, ex, 10, 2, sent.append, None, held.append,
                          lambda: (sent.extend(held), held.clear()))
    w.step = 5
    snapper.maybe()  # a point before the end: at once
    assert [s["step"] for s in sent] == [5] and not held
    w.step = 10
    snapper.maybe()
    assert [s["step"] for s in sent] == [5] and [s["step"] for s in held] == [10]
    snapper.final("completed")
    assert [(s["step"], s["final"]) for s in sent] == [(5, False), (10, False), (10, True)]


class _DictStore:
    """The two calls of a torch store the transport makes, in one process."""

    def __init__(self) -> None:
        self.d: dict[str, bytes] = {}
        self.cv = threading.Condition()

    def set(self, k: str, v: str) -> None:
        with self.cv:
            self.d[k] = v.encode()
            self.cv.notify_all()

    def get(self, k: str) -> bytes:
        with self.cv:
            self.cv.wait_for(lambda: k in self.d, timeout=10)
            return self.d[k]


def test_messages_on_an_idle_link_skip_the_sender_thread_and_big_answers_cross() -> None:
    """Two transports answer each other's requests at the same moment with answers far
    bigger than a socket takes at once: each reader hands its answer to its sender thread
    (a reader blocked writing to a reader blocked writing would wait for ever), while the
    small requests from the calling threads go out at once, never through a queue."""
    big = torch.arange(6 << 20, dtype=torch.float32)  # 24 MB
    got = [threading.Event(), threading.Event()]
    trs: list[Transport] = []

    def on_message(me: int) -> Any:
        def handle(src: int, msg: tuple) -> None:
            if msg[0] == "xreq":
                trs[me].send(src, ("xrep", msg[1], big))
            elif msg[0] == "xrep" and torch.equal(msg[2], big):
                got[me].set()
        return handle

    auth = A.Auth(os.urandom(32))
    store = _DictStore()
    trs.extend(Transport(r, 2, on_message(r), 20.0, auth=auth, max_frame=64 << 20)
               for r in range(2))
    starts = [threading.Thread(target=t.start, args=(store, "127.0.0.1")) for t in trs]
    for t in starts:
        t.start()
    for t in starts:
        t.join(timeout=20)
    for k in range(5):
        for t in trs:
            t.send(1 - t.rank, ("msg", k, torch.ones(4)))
    assert [t.handed_off for t in trs] == [0, 0]  # an idle link: written at once
    for t in trs:
        t.send(1 - t.rank, ("xreq", 1, torch.ones(4)))
    assert all(g.wait(20) for g in got), "the answers did not cross"
    assert [t.dead for t in trs] == [{}, {}]
    assert min(t.handed_off for t in trs) >= 1  # each big answer, from a reader thread
    for t in trs:
        t.close(wait_s=2.0)


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="no per-thread priority here")
def test_rank_0s_evaluator_thread_runs_at_a_lower_priority_than_training() -> None:
    """Evaluation takes the cores training leaves (rank 0 would otherwise step slower
    than the others while it evaluates, and hold up every synchronous round)."""
    import threading

    from relaxsgd.distributed.evaluation import EVAL_NICE, Evaluator

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ev = Evaluator(None, 1)  # type: ignore[arg-type]  # (stopped before any row)
    try:
        seen = None
        for _ in range(200):  # (the thread lowers its own priority as it starts)
            tid = ev._thread.native_id
            if tid is not None:
                seen = os.getpriority(os.PRIO_PROCESS, tid)
                if seen != base:
                    break
            threading.Event().wait(0.01)
        assert seen == min(base + EVAL_NICE, 19)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
    finally:
        ev.stop(5.0)
