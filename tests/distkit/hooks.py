"""Fault injection for the tests and benchmarks of the distributed runtime.

Environment variables read by ``python -m distkit`` (see that module):
``RELAXSGD_TEST_KILL_AT``, ``RELAXSGD_TEST_LEAVE_AT``, ``RELAXSGD_TEST_HOLD_AT``,
``RELAXSGD_TEST_PARTNERS``, ``RELAXSGD_TEST_WIRE_FAULT``,
``RELAXSGD_TEST_EVAL_FAIL``, ``RELAXSGD_BENCH_LEGACY_WIRE``,
``RELAXSGD_BENCH_QUEUED_SENDS`` and ``RELAXSGD_BENCH_TRACE``. Nothing here runs unless one
of them is set.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import torch


def install_hooks() -> None:
    """Install every hook whose environment variable is set (in this process)."""
    _install_kill()
    _install_leave()
    _install_hold()
    _install_partners()
    _install_wire_fault()
    _install_eval_fail()
    _install_legacy_wire()
    _install_queued_sends()
    _install_trace()


def _install_trace() -> None:
    """Benchmarks only: ``RELAXSGD_BENCH_TRACE=<folder>``: every worker records, on the
    machine's monotonic clock (``time.perf_counter``, one clock for every process of a
    machine), when each of its local computations ran (``compute``: [start, end, steps])
    and when its main program waited on a handle (``wait``: [start, end, label]), the
    process's CPU and wall seconds in the run (``cpu``: [cpu, wall]), the elements its
    lattice codec encoded and decoded and the seconds that took (``lattice``), and
    writes them to ``<folder>/run<k>-rank<r>.json`` when its k-th run ends (``distkit
    multi``): what ``benchmarks/sync_trace.py`` reads to see where a round's time goes."""
    folder = os.environ.get("RELAXSGD_BENCH_TRACE")
    if not folder:
        return
    import json
    import time

    from relaxsgd.distributed import executor, runtime

    orig_timed, orig_block, orig_run = (runtime._Job._timed, executor.Executor._block,
                                        runtime._Job.run)
    count = [0]
    coding: dict[str, list[float]] = {"encoded": [0, 0.0], "decoded": [0, 0.0]}

    def timed(self: Any, fn: Any, units: int) -> Any:
        t = time.perf_counter()
        try:
            return orig_timed(self, fn, units)
        finally:
            self.ex.trace["compute"].append([t, time.perf_counter(), units])

    def block(self: Any, h: Any, ctx: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig_block(self, h, ctx)
        finally:
            if ctx.main and hasattr(self, "trace"):
                self.trace["wait"].append([t, time.perf_counter(), str(h.label)])

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.ex.trace = {"compute": [], "wait": [], "rank": self.rank, "n": self.n}
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for v in coding.values():
            v[:] = [0, 0.0]
        try:
            return orig_run(self, *args, **kwargs)
        finally:
            # the process's CPU seconds (every thread) and wall seconds in the run
            self.ex.trace["cpu"] = [time.process_time() - cpu0, time.perf_counter() - wall0]
            self.ex.trace["lattice"] = {k: list(v) for k, v in coding.items()}
            # messages sent, and how many of them went through a sender thread's queue
            self.ex.trace["sends"] = [self.tr.messages, self.tr.handed_off]
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"run{count[0]}-rank{self.rank}.json"), "w",
                      encoding="utf-8") as f:
                json.dump(self.ex.trace, f)
            count[0] += 1

    runtime._Job._timed = timed  # type: ignore[method-assign]
    executor.Executor._block = block  # type: ignore[method-assign]
    runtime._Job.run = run  # type: ignore[method-assign]
    _time_lattice(coding)


def _time_lattice(coding: dict[str, list[float]]) -> None:
    """Time every lattice encode and decode of this process (any thread) into ``coding``
    (``{"encoded"|"decoded": [elements, seconds]}``): the codec's cost per element as the
    run paid it, CPU contention and all (``benchmarks/dist_throughput.py``)."""
    import threading
    import time

    from relaxsgd.quantize.lattice import LatticeQuantizer

    lock = threading.Lock()

    def timed(kind: str, fn: Any, elements: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            dt = time.perf_counter() - t
            with lock:
                coding[kind][0] += elements(args, out)
                coding[kind][1] += dt
            return out
        return inner

    LatticeQuantizer.encode_value = timed(  # type: ignore[method-assign]
        "encoded", LatticeQuantizer.encode_value, lambda a, out: a[1].numel())
    LatticeQuantizer.decode = timed(  # type: ignore[method-assign]
        "decoded", LatticeQuantizer.decode, lambda a, out: out[0].numel())


def _install_queued_sends() -> None:
    """Benchmarks only: ``RELAXSGD_BENCH_QUEUED_SENDS=k1,k2,...``: the k-th run of this
    process (counting from 0, as ``distkit multi`` runs its configs) hands every message
    to the connection's sender thread, as the transport did before its idle-connection
    fast path: the "before" of ``benchmarks/dist_throughput.py``, in the same job."""
    spec = os.environ.get("RELAXSGD_BENCH_QUEUED_SENDS")
    if not spec:
        return
    which = {int(k) for k in spec.split(",") if k}
    from relaxsgd.distributed import runtime

    orig = runtime._Job.__init__
    count = [0]

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        orig(self, *args, **kwargs)
        self.tr.inline_send = count[0] not in which
        count[0] += 1

    runtime._Job.__init__ = init  # type: ignore[method-assign]


def _my_step(var: str) -> int | None:
    """The step of ``var`` (``<rank>:<step>``) if it names this process's rank, else None."""
    spec = os.environ.get(var)
    if not spec:
        return None
    rank, step = (int(x) for x in spec.split(":"))
    return step if int(os.environ.get("RANK", -1)) == rank else None


def _install_kill() -> None:
    step = _my_step("RELAXSGD_TEST_KILL_AT")
    if step is None:
        return
    from relaxsgd.worker import LocalWorker

    orig_note, orig_apply = LocalWorker.note_steps, LocalWorker.apply_grad

    def check(w: LocalWorker) -> None:
        if w.step >= step:
            os.kill(os.getpid(), signal.SIGKILL)

    def note_steps(self: LocalWorker, steps: int) -> None:
        orig_note(self, steps)
        check(self)

    def apply_grad(self: LocalWorker, grad: torch.Tensor) -> None:
        orig_apply(self, grad)
        check(self)

    LocalWorker.note_steps = note_steps  # type: ignore[method-assign]
    LocalWorker.apply_grad = apply_grad  # type: ignore[method-assign]


def _install_leave() -> None:
    """``RELAXSGD_TEST_LEAVE_AT=<rank>:<step>``: that worker dies by SIGKILL at its first
    safe point (``yield Checkpoint()``) at or past that local step: the moment the
    simulator's trace event ``<rank>,leave,<step>`` takes it away (sim/dist parity)."""
    step = _my_step("RELAXSGD_TEST_LEAVE_AT")
    if step is None:
        return
    from relaxsgd.distributed.executor import Executor

    orig = Executor._safe_point

    def safe_point(self: Executor, eff: Any, ctx: Any) -> None:
        if self.w.step >= step and int(os.environ.get("RELAXSGD_INCARNATION", "0") or 0) == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, eff, ctx)

    Executor._safe_point = safe_point  # type: ignore[method-assign]


def _install_hold() -> None:
    """``RELAXSGD_TEST_HOLD_AT=<step>``: every worker of the job's first incarnation waits
    at its first safe point at or past that step until every worker is live again, and
    worker 0 (the donor of a restarted worker of a quorum algorithm, and of a joiner) until
    a handover was asked of it (or it has handed one over already): so a short test job is
    still running when its restarted worker is back, and the handover happens at that safe
    point (or before it, for a joiner that is quick to start)."""
    spec = os.environ.get("RELAXSGD_TEST_HOLD_AT")
    if not spec or int(os.environ.get("RELAXSGD_INCARNATION", "0") or 0) > 0:
        return
    step, held = int(spec), [False]
    import time

    from relaxsgd.distributed.elastic import live_of
    from relaxsgd.distributed.executor import Executor

    orig = Executor._safe_point

    def safe_point(self: Executor, eff: Any, ctx: Any) -> None:
        if self.w.step >= step and not held[0]:
            held[0] = True
            end = time.monotonic() + 60.0
            while time.monotonic() < end and (len(live_of(self.tr)) < self.n or (
                    self.rank == 0 and not (self.donor.due() or self.donor.served))):
                time.sleep(0.02)
        return orig(self, eff, ctx)

    Executor._safe_point = safe_point  # type: ignore[method-assign]


def _install_partners() -> None:
    """``RELAXSGD_TEST_PARTNERS=<prefix>``: every worker appends the peer of each exchange
    it starts to the file ``<prefix>.<its RANK>``, one id a line (who drew whom)."""
    prefix = os.environ.get("RELAXSGD_TEST_PARTNERS")
    if not prefix:
        return
    from relaxsgd.distributed.executor import Executor

    orig = Executor._exchange

    def exchange(self: Executor, eff: Any) -> Any:
        with open(f"{prefix}.{self.rank}", "a", encoding="utf-8") as f:
            f.write(f"{eff.peer}\n")
        return orig(self, eff)

    Executor._exchange = exchange  # type: ignore[method-assign]


class _Marker:
    """Unpickling this creates a file: the pickled payload of the fault tests."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (self.path, "w"))


def _install_wire_fault() -> None:
    spec = os.environ.get("RELAXSGD_TEST_WIRE_FAULT")
    if not spec:
        return
    rank, kind, k = spec.split(":")
    if int(os.environ.get("RANK", -1)) != int(rank):
        return
    import pickle

    from relaxsgd.distributed.transport import HEADER, Transport

    orig = Transport._send_frame
    sent: dict[int, list] = {}

    def send_frame(self: Transport, sock: Any, mac: Any, seq: int, frames: list) -> None:
        past = sent.setdefault(id(sock), [])
        past.append(b"".join(bytes(f) for f in frames))
        if seq != int(k):
            return orig(self, sock, mac, seq, frames)
        if kind == "garble":
            header = HEADER.pack(len(past[-1]))
            tag = mac.tag(seq, header, [past[-1]])
            body = bytearray(past[-1])
            body[len(body) // 2] ^= 0x40
            sock.sendall(header + bytes(body) + tag)
        elif kind == "replay":
            orig(self, sock, mac, seq - 1, [past[-2]])  # the previous frame, verbatim
        elif kind == "oversize":
            sock.sendall(HEADER.pack(1 << 40))
        elif kind == "pickle":
            body = pickle.dumps(("msg", 0, _Marker(os.environ["RELAXSGD_TEST_MARKER"])))
            orig(self, sock, mac, seq, [body])
        else:
            raise ValueError(f"unknown RELAXSGD_TEST_WIRE_FAULT kind {kind!r}")

    Transport._send_frame = send_frame  # type: ignore[method-assign]


def make_test_certs(folder: str) -> dict[str, str]:
    """A throw-away CA and one worker certificate signed by it (the ``openssl`` command),
    as the RELAXSGD_TLS_* environment of a test or benchmark job."""
    import subprocess

    def sh(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
       "-subj", "/CN=relaxsgd test CA")
    sh("req", *ec, "-keyout", "worker.key", "-out", "worker.csr", "-subj", "/CN=worker")
    sh("x509", "-req", "-in", "worker.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
       "-CAcreateserial", "-out", "worker.pem", "-days", "1")
    return {"RELAXSGD_TLS_CERT": os.path.join(folder, "worker.pem"),
            "RELAXSGD_TLS_KEY": os.path.join(folder, "worker.key"),
            "RELAXSGD_TLS_CA": os.path.join(folder, "ca.pem")}


def _install_legacy_wire() -> None:
    """Benchmarks only: ``RELAXSGD_BENCH_LEGACY_WIRE=<file>`` (the pickle wire.py of
    before issue 10) puts that format back on the point-to-point links and all-gathers,
    without frame MACs: the "before" of ``benchmarks/dist_throughput.py --wire``."""
    path = os.environ.get("RELAXSGD_BENCH_LEGACY_WIRE")
    if not path:
        return
    import importlib.util

    from relaxsgd.distributed import collectives, transport
    from relaxsgd.distributed.auth import recv_exact
    from relaxsgd.distributed.sockets import recv_into
    from relaxsgd.distributed.transport import HEADER, Transport

    spec = importlib.util.spec_from_file_location("relaxsgd_legacy_wire", path)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)

    def send(self: Transport, peer: int, msg: tuple, done: Any = None) -> int:
        frames = old.encode(msg)
        size = old.wire_size(frames)
        if peer in self.dead:
            if done is not None:
                done(ConnectionError(self.dead[peer]))
            return 0
        self._queues[peer].put((frames, done), size, self.peer_timeout)
        with self._lock:
            self.wire_bytes += size
            self.messages += 1
        return size

    def legacy_frame(self: Transport, sock: Any, mac: Any, seq: int, frames: list) -> None:
        if old.wire_size(frames) <= 1 << 16:
            sock.sendall(b"".join(frames))
        else:
            for f in frames:
                sock.sendall(f)

    def read_frame(self: Transport, conn: Any, mac: Any, seq: int, src: int) -> tuple:
        (size,) = HEADER.unpack(recv_exact(conn, HEADER.size))
        buf = bytearray(size)
        recv_into(conn, buf)
        return old.decode(buf, self.device)

    Transport.send = send  # type: ignore[method-assign]
    Transport._send_frame = legacy_frame  # type: ignore[method-assign]
    Transport._read_frame = read_frame  # type: ignore[method-assign]
    transport.encode = old.encode  # (the goodbye of close())
    collectives.encode = lambda obj: old.encode(obj)[1:]  # (without the length header)
    collectives.decode = old.decode


def _install_eval_fail() -> None:
    if os.environ.get("RELAXSGD_TEST_EVAL_FAIL") != "1":
        return
    from relaxsgd.distributed.evaluation import Evaluator

    def record(self: Evaluator, snaps: list[dict]) -> None:
        raise RuntimeError("injected evaluation failure (RELAXSGD_TEST_EVAL_FAIL)")

    Evaluator._record = record  # type: ignore[method-assign]
