"""``relaxsgd calibrate``'s timings through the dist runtime's own path (the executor).

What a run pays is not raw gloo or raw TCP: every effect goes through
:class:`~relaxsgd.distributed.executor.Executor` (handles, copies, the wire encoding,
frame tags, the transport's threads). So each measurement here is a small worker program
run by a real executor on a real, authenticated transport, timed around its ``yield``:

- ``allreduce`` and ``allgather``: :class:`AllReduce` of ``B/4`` floats and
  :class:`AllGather` of a ``B``-byte tensor, every worker, after a barrier;
- ``exchange``: worker 0's blocking :class:`Exchange` of ``B`` bytes with worker 1, which
  answers with ``B`` bytes from its reader thread (as SwarmSGD's partner does);
- ``sendrecv``: worker 0 sends ``B`` bytes to worker 1 (:class:`Send`), which receives
  them (:class:`Recv`) and sends ``B`` bytes back: a round trip of two messages;
- ``server``: every worker's :class:`ServerRound` of ``B`` bytes up and ``B`` down through
  the dist runtime's parameter server (:mod:`relaxsgd.distributed.server`, a thread of
  worker 0, here serving :class:`_EchoServer`), timed on worker 1 (worker 0's own upload
  skips the network).

Each size's time is the median of ``repeats``; :mod:`.fit` turns them into the
simulator's terms.

Under load (``busy``): the exchange, send/recv and server round trips are timed a second
time (``exchange_busy``, ``sendrecv_busy``, ``server_busy``) while every worker but the
timing one runs local steps on a thread of its own, as in a run: the partner's reader
thread answers while its worker computes, the server's thread serves while worker 0
computes. Where workers share cores (more processes than cores) each message then waits
for the scheduler, and that, not the idle path, is what a run's messages pay.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms.base import (
    AllGather,
    AllReduce,
    Exchange,
    Program,
    Recv,
    Reply,
    Send,
    ServerRound,
)


class _Echo:
    """The algorithm of the timing programs: an exchange is answered with a payload of
    the request's size (a fresh tensor, as a real answer would be)."""

    def on_exchange(self, w: Any, src: int, payload: Any) -> Reply:
        return Reply(torch.empty_like(payload), payload.numel())


class _EchoServer:
    """The parameter server of the timing programs: the reply is worker 0's upload (the
    size of one), served at once."""

    def init_state(self, numel: int, layout: Any, device: Any) -> dict[str, Any]:
        return {}

    def serve(self, state: dict[str, Any], payloads: list[Any]) -> Any:
        return payloads[0]


class _Stub:
    """The little of a worker the executor reads outside local steps."""

    step = 0

    def count(self, *args: Any, **kwargs: Any) -> None:
        pass


def _program(effects: list[Any]) -> Program:
    for eff in effects:  # noqa: UP028 - a list cannot take the results sent back
        yield eff


def _timed(ex: Any, effects: Any, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` runs of the program ``effects()``, each started
    after a barrier (outside the program: its code runs under the worker lock, which the
    reader thread needs to answer an exchange)."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        ex.start(_program(effects()))
        if ex.advance() is not None:
            raise RuntimeError("a timing program asked for local computation")
        times.append(time.perf_counter() - t)
    return times


class _Busy:
    """Local steps (``step()``) on a thread of their own until stopped: a computing
    worker, while its main thread times messages."""

    def __init__(self, step: Callable[[], None]) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(step,),
                                        name="relax-calibrate-busy", daemon=True)
        self._thread.start()

    def _loop(self, step: Callable[[], None]) -> None:
        while not self._stop.is_set():
            step()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def executor_times(ex: Any, rank: int, sizes: list[int], repeats: int,
                   busy: Callable[[], None] | None = None) -> dict[str, list[list[float]]]:
    """{kind: [[bytes, median seconds], ...]} through ``ex`` (every rank calls this); with
    ``busy`` (one local step) also the round trips under load (the module doc)."""
    out = _times(ex, rank, sizes, repeats)
    if busy is not None:
        # the timing rank waits on its messages; every other rank computes meanwhile
        # (worker 1 times the server rounds, worker 0 the others)
        for kind, timer in (("exchange", 0), ("sendrecv", 0), ("server", 1)):
            work = _Busy(busy) if rank != min(timer, dist.get_world_size() - 1) else None
            try:
                got = _times(ex, rank, sizes, repeats, kinds=(kind,))
            finally:
                if work is not None:
                    work.stop()
            out[f"{kind}_busy"] = got[kind]
    return out


def _times(ex: Any, rank: int, sizes: list[int], repeats: int,
           kinds: tuple[str, ...] | None = None) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {"allreduce": [], "allgather": [], "exchange": [],
                                         "sendrecv": [], "server": []}
    for b in sizes:
        x = torch.zeros(max(b // 4, 1), device="cpu")
        u = torch.zeros(max(b, 1), dtype=torch.uint8, device="cpu")
        programs = {"allreduce": lambda x=x: [AllReduce(x, x.numel() * 4)],
                    "allgather": lambda u=u: [AllGather(u, u.numel())],
                    "server": lambda u=u: [ServerRound(u, u.numel(), u.numel())]}
        if rank == 0:
            programs["exchange"] = lambda u=u: [Exchange(1, u, u.numel())]
            programs["sendrecv"] = lambda u=u: [Send(1, u, u.numel(), tag=0, blocking=True),
                                                Recv(1, tag=0)]
        elif rank == 1:
            programs["exchange"] = lambda: []  # answered by the reader thread meanwhile
            programs["sendrecv"] = lambda u=u: [Recv(0, tag=0),
                                                Send(0, u, u.numel(), tag=0, blocking=True)]
        else:
            programs["exchange"] = programs["sendrecv"] = lambda: []
        for kind, effects in programs.items():
            if kinds is not None and kind not in kinds:
                continue
            _timed(ex, effects, 2)  # warm-up (connections, allocator)
            out[kind].append([float(b), statistics.median(_timed(ex, effects, repeats))])
    if kinds is not None and "server" not in kinds:
        return out
    # the server's rounds as worker 1 sees them (worker 0 hosts the server)
    t = torch.tensor([v for _, v in out["server"]], dtype=torch.float64)
    dist.broadcast(t, min(1, dist.get_world_size() - 1))
    out["server"] = [[b, float(v)] for (b, _), v in zip(out["server"], t, strict=True)]
    return out
