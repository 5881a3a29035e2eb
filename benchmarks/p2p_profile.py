"""Where the time of one point-to-point exchange goes, and what an executor all-reduce costs.

    python benchmarks/p2p_profile.py                 # d = the throughput benchmark's model
    python benchmarks/p2p_profile.py --d 100000 --reps 300

Four sections, each printed as a table (medians; microseconds unless said):

0. SwarmSGD's lattice codec (8 bits, one eps a tensor, the model's layout) per message, in
   milliseconds: the sender's encode (the payload and its own decoded copy), the
   receiver's decode; with ``--codec-before COMMIT`` also the codec of that commit
   (``src/relaxsgd/quantize/lattice.py`` loaded from git; its sender decoded its own
   payload a second time), interleaved in the same loop. Then the other quantizers a
   message may pass through (qsgd difference, top-k 1%), current code only.

1. CPU per message of ``d`` float32 parameters in this process: encoding
   (:func:`relaxsgd.distributed.wire.encode`), the frame tag (HMAC-SHA256 and Poly1305,
   sender and receiver each compute one), decoding with the message check, and the copy
   that joining the frames into one buffer would cost.
2. Round trip of an exchange (``xreq`` answered by ``xrep`` with the same payload, from the
   responder's reader thread, as the executor answers) between two processes over
   loopback: raw TCP of the same bytes (the floor), the transport with the responder idle,
   and with the responder's main thread busy with small torch operations (a worker
   computing), with every message handed to the connection's sender thread (the transport
   before this benchmark was written) and written by the thread that sends it when the
   connection is idle (``Transport.inline_send``, now the default).
3. All-reduce of ``d`` floats among 4 processes: raw ``dist.all_reduce`` and the
   executor's :class:`~relaxsgd.algorithms.base.AllReduce` effect (what a run pays).

The machine is shared: print ``uptime`` beside the figures; the ratios within one run are
what to compare.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import threading
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SECRET = "p2p-profile-secret-0123456789abcdef"


def median_us(fn: Any, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


# -- 0. the codecs ------------------------------------------------------------------------
def lattice_at(commit: str) -> Any:
    """``relaxsgd/quantize/lattice.py`` as of ``commit`` (git show), as a module of the
    package (its relative imports resolve against the current tree)."""
    import importlib.util
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    text = subprocess.run(["git", "show", f"{commit}:src/relaxsgd/quantize/lattice.py"],
                          cwd=root, check=True, capture_output=True, text=True).stdout
    spec = importlib.util.spec_from_loader("relaxsgd.quantize._lattice_before", None)
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    mod.__package__ = "relaxsgd.quantize"
    sys.modules[spec.name] = mod  # type: ignore[union-attr]  (dataclasses look it up)
    exec(compile(text, f"lattice.py@{commit}", "exec"), mod.__dict__)  # our own source
    return mod


def codec_costs(sizes: list[int], reps: int, before: str | None) -> dict[str, float]:
    """Milliseconds a message (medians of ``reps``, the ways interleaved)."""
    import torch

    from relaxsgd.compress.topk import TopK
    from relaxsgd.quantize.lattice import LatticeQuantizer
    from relaxsgd.quantize.qsgd_diff import QSGDDiffQuantizer

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(n, generator=g) * 0.05 for n in sizes]
    refs = [x + 1e-3 * torch.randn(x.shape, generator=g) for x in xs]
    new = LatticeQuantizer(8)
    eps = new.eps_for(2e-3)
    pays = [new.encode(x, eps, g) for x in xs]
    ways: dict[str, Any] = {
        "lattice encode + own copy": lambda: [new.encode_value(x, eps, g) for x in xs],
        "lattice decode": lambda: [new.decode(p, r) for p, r in zip(pays, refs, strict=True)]}
    if before:
        old = lattice_at(before).LatticeQuantizer(8)
        if hasattr(old, "encode_value"):  # the own copy made by the encoder, as now
            ways[f"  at {before}: encode + own copy"] = lambda: [
                old.encode_value(x, eps, g) for x in xs]
        else:  # before encode_value: the sender decoded its own message
            ways[f"  at {before}: encode + own copy"] = lambda: [
                old.decode(old.encode(x, eps, g), x) for x in xs]
        ways[f"  at {before}: decode"] = lambda: [old.decode(p, r)
                                                  for p, r in zip(pays, refs, strict=True)]
    flat, flat_ref = torch.cat(xs), torch.cat(refs)
    qd, tk = QSGDDiffQuantizer(8), TopK(0.01)
    qp = qd.encode(flat, generator=g, reference=flat_ref)
    ways.update({"qsgd-diff encode": lambda: qd.encode(flat, generator=g, reference=flat_ref),
                 "qsgd-diff decode": lambda: qd.decode(qp, flat_ref),
                 "top-k 1% compress": lambda: tk.compress(flat, {})})
    got: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(reps):
        for k, fn in ways.items():
            t = time.perf_counter()
            fn()
            got[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in got.items()}


# -- 1. CPU per message ------------------------------------------------------------------
def message_costs(d: int, reps: int) -> dict[str, float]:
    import torch

    from relaxsgd.distributed import auth as A
    from relaxsgd.distributed import wire
    from relaxsgd.distributed.transport import HEADER

    msg = ("xreq", 12, {"kind": "full", "data": torch.randn(d), "seq": 7})
    frames = wire.encode(msg)
    header = HEADER.pack(wire.wire_size(frames))
    buf = bytearray(b"".join(bytes(f) for f in frames))
    out = {"encode": median_us(lambda: wire.encode(msg), reps),
           "tag HMAC-SHA256": median_us(
               lambda: A.FrameMac(b"k" * 32, False).tag(1, header, frames), reps)}
    if A.Poly1305 is not None:
        out["tag Poly1305"] = median_us(
            lambda: A.FrameMac(b"k" * 32, True).tag(1, header, frames), reps)
    out["join frames (a copy)"] = median_us(lambda: b"".join(frames), reps)
    out["decode + check"] = median_us(lambda: wire.check_message(wire.decode(buf)), reps)
    return out


# -- 2. round trips between two processes ------------------------------------------------
def _busy(stop: threading.Event) -> None:
    """A worker computing: many small torch operations (GIL held between them)."""
    import torch

    x = torch.randn(256)
    while not stop.is_set():
        for _ in range(200):
            x = torch.tanh(x * 1.0001 + 0.01)


def _raw_side(rank: int, store: Any, nbytes: int, reps: int) -> list[float]:
    """Raw TCP ping-pong of ``nbytes`` (8-byte length, then the bytes)."""
    from relaxsgd.distributed.sockets import recv_into

    buf = bytearray(nbytes)
    if rank == 1:
        srv = socket.create_server(("127.0.0.1", 0))
        store.set("raw", str(srv.getsockname()[1]))
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(reps + 1):
            recv_into(c, bytearray(8))
            recv_into(c, buf)
            c.sendall(struct.pack("!Q", nbytes))
            c.sendall(buf)
        c.close()
        srv.close()
        return []
    c = socket.create_connection(("127.0.0.1", int(store.get("raw"))))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        c.sendall(struct.pack("!Q", nbytes))
        c.sendall(buf)
        recv_into(c, bytearray(8))
        recv_into(c, buf)
        times.append(time.perf_counter() - t)
    c.close()
    return times[1:]


def pair_worker(rank: int, port: int, d: int, reps: int, inline: bool, q: Any) -> None:
    import torch
    import torch.distributed as dist

    from relaxsgd.distributed import auth as A
    from relaxsgd.distributed.transport import Transport

    torch.set_num_threads(1)
    os.environ["RELAXSGD_SECRET"] = SECRET
    store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=__import__("datetime")
                          .timedelta(seconds=60))
    results: dict[str, float] = {}
    for label, nbytes in (("8 B", 8), (f"{d} floats", 4 * d)):
        raw = _raw_side(rank, store, nbytes, reps)
        store.set(f"rawdone{rank}{nbytes}", "1")
        store.wait([f"rawdone{1 - rank}{nbytes}"])
        if raw:
            results[f"raw TCP, {label}"] = statistics.median(raw) * 1e6
    got = threading.Event()
    stop = threading.Event()
    box: dict[str, Any] = {}

    def on_message(src: int, msg: tuple) -> None:
        if msg[0] == "xreq":
            tr.send(src, ("xrep", msg[1], msg[2]))
        elif msg[0] == "xrep":
            got.set()
        elif msg[0] == "done":
            stop.set()

    tr = Transport(rank, 2, on_message, 30.0, auth=A.from_env(), max_frame=8 * d + (1 << 20))
    tr.inline_send = inline
    tr.start(store, "127.0.0.1", prefix=f"prof{inline}")
    for busy in (False, True):
        for label, payload in (("8 B", torch.zeros(2)), (f"{d} floats", torch.randn(d))):
            key = f"{'busy' if busy else 'idle'}{label}"
            if rank == 1:
                stop.clear()
                store.set(f"ready{key}", "1")
                _busy(stop) if busy else stop.wait()
                continue
            store.wait([f"ready{key}"])
            times = []
            for k in range(reps + 1):
                got.clear()
                t = time.perf_counter()
                tr.send(1, ("xreq", k, payload))
                got.wait()
                times.append(time.perf_counter() - t)
            tr.send(1, ("done",))
            box[key] = statistics.median(times[1:]) * 1e6
            what = "responder busy" if busy else "responder idle"
            results[f"transport, {what}, {label}"] = box[key]
    time.sleep(0.2)
    tr.close(wait_s=2.0)
    if rank == 0:
        q.put(results)


def round_trips(d: int, reps: int, inline: bool) -> dict[str, float]:
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 3, True, timeout=datetime.timedelta(seconds=60),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=pair_worker, args=(r, store.port, d, reps, inline, q))
          for r in range(2)]
    for p in ps:
        p.start()
    out = q.get(timeout=600)
    for p in ps:
        p.join(timeout=30)
    return out


# -- 3. all-reduce: raw gloo and the executor ---------------------------------------------
def allreduce_worker(rank: int, port: int, n: int, d: int, reps: int, q: Any) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from relaxsgd.algorithms.base import AllReduce
    from relaxsgd.distributed.executor import Executor, _Ctx
    from relaxsgd.distributed.options import DistOptions
    from relaxsgd.distributed.transport import Transport

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, n + 1, False,
                          timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n)
    x = torch.randn(d)
    tr = Transport(rank, n, lambda s, m: None, 30.0, auth=_insecure())
    ex = Executor(None, None, tr, DistOptions(), [], torch.device("cpu"))  # type: ignore
    ctx = _Ctx(main=True)
    ways = {"raw dist.all_reduce": lambda: dist.all_reduce(x),
            "executor AllReduce": lambda: ex._dispatch(AllReduce(x), ctx)}
    got: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(3):  # interleaved rounds
        for k, fn in ways.items():
            for _ in range(reps // 3 + 1):
                dist.barrier()
                t = time.perf_counter()
                fn()
                got[k].append(time.perf_counter() - t)
    if rank == 0:
        q.put({k: statistics.median(v) * 1e6 for k, v in got.items()})
    dist.destroy_process_group()


def _insecure() -> Any:
    from relaxsgd.distributed import auth as A

    return A.Auth(A.INSECURE_KEY, True)


def allreduces(n: int, d: int, reps: int) -> dict[str, float]:
    import datetime

    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, n + 1, True, timeout=datetime.timedelta(seconds=60),
                          wait_for_workers=False)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [ctx.Process(target=allreduce_worker, args=(r, store.port, n, d, reps, q))
          for r in range(n)]
    for p in ps:
        p.start()
    out = q.get(timeout=600)
    for p in ps:
        p.join(timeout=30)
    return out


def model_sizes() -> list[int]:
    """The sizes of the throughput benchmark's model's parameter tensors."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dist_throughput import N, config
    from relaxsgd.config import from_dict
    from relaxsgd.run import prepare

    model = prepare(from_dict({**config("allreduce", {}, 1), "workers": N})).spec.model_fn()
    return [p.numel() for p in model.parameters()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d", type=int, default=0, help="parameters (default: the "
                    "throughput benchmark's model)")
    ap.add_argument("--reps", type=int, default=100)
    ap.add_argument("--codec-before", metavar="COMMIT", help="also time the lattice codec "
                    "of this commit (e.g. 5469e81~1), interleaved")
    ap.add_argument("--codec-only", action="store_true", help="section 0 only")
    a = ap.parse_args()
    sizes = [a.d] if a.d else model_sizes()
    d = sum(sizes)
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1 and 5 min); "
          f"d = {d} float32 parameters ({4 * d / 1e6:.2f} MB) in {len(sizes)} tensors")
    import torch

    torch.set_num_threads(1)  # as each worker process runs
    print(f"0. codecs per message, this process, one thread (ms, median of {a.reps}):")
    for k, v in codec_costs(sizes, a.reps, a.codec_before).items():
        print(f"   {k:<36} {v:9.2f}")
    if a.codec_only:
        return
    print("1. CPU per message, this process (us, median):")
    for k, v in message_costs(d, a.reps).items():
        print(f"   {k:<28} {v:9.0f}")
    rts = {inline: round_trips(d, a.reps, inline) for inline in (False, True)}
    print(f"2. round trip between two processes (us, median of {a.reps}): every message "
          "through the sender thread | written by its own thread when the link is idle")
    for k, v in rts[False].items():
        print(f"   {k:<44} {v:9.0f} {rts[True][k]:9.0f}")
    print("3. all-reduce among 4 processes (us, median):")
    for k, v in allreduces(4, d, a.reps).items():
        print(f"   {k:<28} {v:9.0f}")


if __name__ == "__main__":
    main()
