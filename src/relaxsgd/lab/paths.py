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
"""

from __future__ import annotations

import statistics
import time
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


def executor_times(ex: Any, rank: int, sizes: list[int],
                   repeats: int) -> dict[str, list[list[float]]]:
    """{kind: [[bytes, median seconds], ...]} through ``ex`` (every rank calls this)."""
    out: dict[str, list[list[float]]] = {"allreduce": [], "allgather": [], "exchange": [],
                                         "sendrecv": [], "server": []}
    for b in sizes:
        x = torch.zeros(max(b // 4, 1), device="cpu")
        u = torch.zeros(max(b, 1), dtype=torch.uint8, device="cpu")
        kinds = {"allreduce": lambda x=x: [AllReduce(x, x.numel() * 4)],
                 "allgather": lambda u=u: [AllGather(u, u.numel())],
                 "server": lambda u=u: [ServerRound(u, u.numel(), u.numel())]}
        if rank == 0:
            kinds["exchange"] = lambda u=u: [Exchange(1, u, u.numel())]
            kinds["sendrecv"] = lambda u=u: [Send(1, u, u.numel(), tag=0, blocking=True),
                                             Recv(1, tag=0)]
        elif rank == 1:
            kinds["exchange"] = lambda: []  # answered by the reader thread meanwhile
            kinds["sendrecv"] = lambda u=u: [Recv(0, tag=0),
                                             Send(0, u, u.numel(), tag=0, blocking=True)]
        else:
            kinds["exchange"] = kinds["sendrecv"] = lambda: []
        for kind, effects in kinds.items():
            _timed(ex, effects, 2)  # warm-up (connections, allocator)
            out[kind].append([float(b), statistics.median(_timed(ex, effects, repeats))])
    # the server's rounds as worker 1 sees them (worker 0 hosts the server)
    t = torch.tensor([v for _, v in out["server"]], dtype=torch.float64)
    dist.broadcast(t, min(1, dist.get_world_size() - 1))
    out["server"] = [[b, float(v)] for (b, _), v in zip(out["server"], t, strict=True)]
    return out
