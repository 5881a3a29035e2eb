"""Collectives of the distributed runtime: all-reduce (mean) and all-gather of any object.

Both are issued with ``async_op=True`` and return a :class:`DHandle` at once; the caller
waits for it only when the program needs the result. A handle's ``finish`` turns the
finished buffers into the effect's result (divide by n, split a list back into its
tensors, decode gathered payloads), in the waiting thread.

Byte counts follow the simulator (the algorithm's declared sizes through the cost model of
the collective) so that a dist run's ``bytes_sent_*`` columns mean what they mean in a
simulated one; what the collective really moved (dense tensors, encoded payloads) is
counted separately as wire bytes. Gathered payloads use the safe encoding of :mod:`.wire`
(no pickle): each worker decodes only checked bytes, and a size announced above the
run's largest legitimate message is refused before anything is allocated.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms.base import AllGather, AllReduce, Handle, tensor_nbytes
from .transport import PeerLost
from .wire import WireError, decode, encode


class DHandle(Handle):
    """A pending result: set from any thread, waited for in the program's thread."""

    __slots__ = ("event", "error", "finish", "peer", "collective", "deadline", "rid",
                 "_flock")

    def __init__(self, label: str, collective: bool = False, peer: int | None = None,
                 deadline: float | None = None) -> None:
        super().__init__(label)
        self.event = threading.Event()
        self.error: BaseException | None = None
        self.finish: Callable[[], Any] | None = None
        self.peer, self.collective, self.deadline = peer, collective, deadline
        self.rid: int | None = None
        self._flock = threading.Lock()

    def resolve(self, value: Any) -> None:
        if not self.event.is_set():
            self.value, self.done = value, True
            self.event.set()

    def fail(self, error: BaseException) -> None:
        if not self.event.is_set():
            self.error, self.done = error, True
            self.event.set()

    def result(self) -> Any:
        """The value (once ``event`` is set); raises the error it failed with."""
        if self.error is not None:
            raise self.error
        with self._flock:
            if self.finish is not None:
                self.value, self.finish = self.finish(), None
        return self.value


def _on_work(h: DHandle, work: Any) -> None:
    def done(fut: Any) -> None:
        try:
            fut.value()
        except Exception as e:  # noqa: BLE001 - the waiter re-raises it with context
            h.fail(e)
            return
        h.resolve(None)

    work.get_future().add_done_callback(done)


class Counts:
    """What one worker sent: declared (simulator-comparable) and real wire bytes."""

    def __init__(self) -> None:
        self.bytes = 0.0
        self.messages = 0
        self.wire = 0.0
        self.server_bytes = 0.0
        self.server_messages = 0
        self._lock = threading.Lock()

    def add(self, nbytes: float, messages: int, wire: float) -> None:
        with self._lock:
            self.bytes += int(nbytes)  # truncated per message, as the simulator does
            self.messages += messages
            self.wire += wire


def all_reduce(eff: AllReduce, n: int, group: Any, counts: Counts,
               device: torch.device | None = None) -> DHandle:
    """Mean over all workers of a tensor or a list of tensors (fresh results, on the
    devices of the inputs; NCCL reduces CPU tensors on this worker's GPU)."""
    many = isinstance(eff.tensors, (list, tuple))
    ts = list(eff.tensors) if many else [eff.tensors]
    declared = eff.nbytes if eff.nbytes is not None else tensor_nbytes(eff.tensors)
    h = DHandle("all-reduce", collective=True)
    same = len({t.dtype for t in ts}) == 1 and len({t.device for t in ts}) == 1
    bufs = ([torch.cat([t.detach().reshape(-1) for t in ts])] if same
            else [t.detach().clone().reshape(-1) for t in ts])
    if device is not None and device.type == "cuda":
        bufs = [b.to(device) for b in bufs]
    if n > 1:
        counts.add(2 * (n - 1) / n * declared, 2 * (n - 1),
                   2 * (n - 1) / n * sum(tensor_nbytes(b) for b in bufs))
        works = [dist.all_reduce(b, group=group, async_op=True) for b in bufs]
        for w in works[:-1]:
            w.wait()  # several only for mixed dtypes; the last one's future completes h
        _on_work(h, works[-1])
    else:
        h.resolve(None)

    def finish() -> Any:
        out = []
        for b in bufs:
            b.div_(n)
        flat = bufs[0] if same else None
        off = 0
        for k, t in enumerate(ts):
            if same:
                out.append(flat[off:off + t.numel()].view(t.shape).to(t.device))
                off += t.numel()
            else:
                out.append(bufs[k].view(t.shape).to(t.device))
        return out if many else out[0]

    h.finish = finish
    return h


def work_handle(work: Any, label: str) -> DHandle:
    """A handle that completes with a collective's work (``async_op=True``)."""
    h = DHandle(label, collective=True)
    _on_work(h, work)
    return h


def all_gather(eff: AllGather, n: int, rank: int, group: Any, counts: Counts,
               device: torch.device, wait: Callable[[DHandle], Any],
               max_bytes: int = 1 << 30) -> Any:
    """Every worker's payload, by rank: two collectives (sizes, then the padded payloads,
    encoded by :mod:`.wire`), each waited for with ``wait`` (the executor's fault-aware
    wait); a payload over ``max_bytes`` is refused. The executor runs it on a spawn's
    thread when it is non-blocking."""
    frames = encode((eff.payload, float(eff.nbytes)))
    blob = b"".join(bytes(f) for f in frames)
    if len(blob) > max_bytes:
        raise WireError(f"an all-gather payload of {len(blob)} bytes exceeds the limit of "
                        f"{max_bytes} (RELAXSGD_MAX_MESSAGE_MB)")
    mine = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else \
        torch.zeros(0, dtype=torch.uint8, device="cpu")
    on = device if device.type != "cpu" else None
    size = torch.tensor([mine.numel()], dtype=torch.int64, device=on)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    wait(work_handle(dist.all_gather(sizes, size, group=group, async_op=True),
                     "all-gather (sizes)"))
    top = int(max(int(s) for s in sizes))
    if not 0 <= top <= max_bytes or min(int(s) for s in sizes) < 0:
        raise PeerLost(f"an all-gather size of {top} bytes, above the limit of {max_bytes} "
                       "(RELAXSGD_MAX_MESSAGE_MB)")
    padded = torch.zeros(top, dtype=torch.uint8, device=on)
    padded[:mine.numel()] = mine
    outs = [torch.zeros_like(padded) for _ in range(n)]
    wait(work_handle(dist.all_gather(outs, padded, group=group, async_op=True),
                     "all-gather"))
    got = [_payload(decode(bytearray(o[:int(s)].cpu().numpy().tobytes()), on), r)
           for r, (o, s) in enumerate(zip(outs, sizes, strict=True))]
    payloads = [g[0] for g in got]
    declared = [g[1] for g in got]
    if eff.pattern != "ring":
        raise ValueError(f"unknown AllGather pattern {eff.pattern!r}; use ring (a parameter "
                         "server is the ServerRound effect)")
    counts.add((n - 1) / n * sum(declared), n - 1, (n - 1) * (top + 8))
    return payloads


def _payload(got: Any, src: int) -> tuple[Any, float]:
    """(payload, declared bytes) of a gathered message, checked."""
    if type(got) is not tuple or len(got) != 2 or not isinstance(got[1], (int, float)):
        raise WireError(f"worker {src}'s all-gather payload is not (payload, nbytes)")
    return got
