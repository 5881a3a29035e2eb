"""Evaluation in the distributed runtime: per-worker snapshots, rows assembled on rank 0.

Every worker takes a snapshot of its model (parameters, BatchNorm buffers, samples, training
loss, counters, bytes, stall) each time its local step count reaches an evaluation point
``k * ceil(steps / evals)`` (checked at every step boundary and before every local effect,
so a synchronous algorithm is snapshot where the simulator evaluates it), and once more when
its program has finished. It sends the snapshot to rank 0 over the point-to-point
transport, without any collective, so that taking it never makes a worker wait for another:
asynchronous algorithms stay asynchronous. A snapshot of a model still equal to the run's
common initial model (the evaluation at step 0) travels without its tensors and rank 0
fills them in (:class:`InitialModel`). Rank 0's evaluator thread writes the row of
evaluation point k as soon as it has every (live) worker's snapshot of point k: the models
of all workers at the same local step, which for an asynchronous algorithm were taken at
different wall times (the row's time is the latest of them). The final row is the state
after every worker finished, including its final communication.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..metrics import CommStats, Recorder, aggregate_worker_metrics
from .wire import WireError

_NUM = (int, float)
SNAP_FIELDS: dict[str, Any] = {
    "rank": int, "indices": list, "final": bool, "status": str, "step": int,
    "samples": int, "wall": _NUM, "params": torch.Tensor, "buffers": dict, "loss": tuple,
    "counters": dict, "obs_sum": dict, "obs_count": dict, "bytes": _NUM, "messages": int,
    "wire": _NUM, "server_bytes": _NUM, "server_messages": int, "stall": _NUM,
    "compute_time": _NUM, "units": int, "program_s": (float, int, type(None)),
    "initial": bool,
}
MAX_KEYS = 1000


@dataclass(frozen=True)
class SnapshotSpec:
    """What a valid snapshot of this run looks like (rank 0 checks every one it gets)."""

    n: int
    params: tuple[torch.Size, torch.dtype]
    buffers: dict[str, tuple[torch.Size, torch.dtype]]
    max_index: int

    def check(self, snap: Any, src: int) -> dict:
        """``snap`` if it is a valid snapshot from worker ``src``, else :class:`WireError`."""
        if type(snap) is not dict or set(snap) != set(SNAP_FIELDS):
            raise WireError("a snapshot without the expected fields")
        for k, t in SNAP_FIELDS.items():
            if not isinstance(snap[k], t):
                raise WireError(f"a snapshot whose {k!r} is a {type(snap[k]).__name__}")
        if snap["rank"] != src:
            raise WireError(f"worker {src} sent a snapshot of worker {snap['rank']}")
        if snap["initial"]:  # the initial model's, filled in by rank 0 (InitialModel)
            _same(snap["params"], (torch.Size([0]), self.params[1]), "parameters")
            if snap["buffers"]:
                raise WireError("a snapshot of the initial model with buffers")
        else:
            _same(snap["params"], self.params, "parameters")
            if set(snap["buffers"]) != set(self.buffers):
                raise WireError("a snapshot with other buffers than the model's")
        for k, v in snap["buffers"].items():
            _same(v, self.buffers[k], f"buffer {k!r}")
        idx = snap["indices"]
        if len(idx) > self.max_index + 1 or not all(
                type(i) is int and 0 <= i <= self.max_index for i in idx):
            raise WireError("a snapshot with evaluation points out of range")
        loss = snap["loss"]
        if len(loss) != 2 or not all(isinstance(x, _NUM) for x in loss):
            raise WireError("a snapshot with a malformed loss")
        for k in ("counters", "obs_sum", "obs_count"):
            d = snap[k]
            if len(d) > MAX_KEYS or not all(type(a) is str and isinstance(b, _NUM)
                                            for a, b in d.items()):
                raise WireError(f"a snapshot with malformed {k}")
        return snap


def _same(t: Any, want: tuple[torch.Size, torch.dtype], what: str) -> None:
    if not isinstance(t, torch.Tensor) or (t.shape, t.dtype) != want:
        raise WireError(f"a snapshot whose {what} are not a {want[1]} tensor of shape "
                        f"{tuple(want[0])}")


class InitialModel:
    """The run's initial model (parameters and buffers, on the CPU), the same on every
    worker: each builds it from the run's seed (:class:`~relaxsgd.bank.Bank`).

    A worker whose model still equals it (the evaluation at step 0) sends its snapshot
    without the tensors (``initial``: parameters of shape (0,), no buffers) and rank 0
    fills them in from its own copy (:meth:`fill`): the row is the same, and the evaluation
    at step 0 no longer puts n-1 whole models on the network ahead of the first round's
    messages. Measured in the network lab (25 ms one way, 80 Mbit/s, 2 workers, MNIST-1D
    MLP): worker 1's 376 KB snapshot took 195 ms on its fresh connection (TCP's window
    still small) and held the first OLCO3 upload behind it on the same stream."""

    def __init__(self, params: torch.Tensor, buffers: dict[str, torch.Tensor]) -> None:
        self.params = params.detach().to("cpu", copy=True)
        self.buffers = {k: v.detach().to("cpu", copy=True) for k, v in buffers.items()}

    def matches(self, params: torch.Tensor, buffers: dict[str, torch.Tensor]) -> bool:
        """Whether a model (CPU tensors) equals this one, value for value."""
        return (set(buffers) == set(self.buffers) and _equal(params, self.params)
                and all(_equal(v, self.buffers[k]) for k, v in buffers.items()))

    def fill(self, snap: dict) -> dict:
        """``snap`` (checked, ``initial``) with this model's tensors (copies) in it."""
        snap["params"] = self.params.clone()
        snap["buffers"] = {k: v.clone() for k, v in self.buffers.items()}
        return snap


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


class _Proxy:
    def __init__(self, s: dict[str, Any]) -> None:
        self.counters, self.obs_sum, self.obs_count = s["counters"], s["obs_sum"], s["obs_count"]


class Snapshotter:
    """Worker side: decides when to snapshot and ships the snapshot to rank 0."""

    def __init__(self, w: Any, bank: Any, ex: Any, total: int, evals: int,
                 send: Any, initial: InitialModel | None = None,
                 hold: Any = None, release: Any = None) -> None:
        self.w, self.bank, self.ex, self.send = w, bank, ex, send
        self.every = max(1, math.ceil(total / evals))
        self.next = 0
        self.total = total
        # (a worker other than rank 0: its model while it may still be the initial one)
        self.initial = initial
        # a worker other than rank 0: the snapshot taken at its last step is held back
        # (``hold``) and sent with the final one (``release``): nobody can write that row
        # before this worker ends, and sent at once it would go on the network ahead of
        # the last round's messages (the drain of OLCO3's rounds in flight)
        self.hold, self.release = hold, release

    def maybe(self) -> None:
        if self.w.step >= self.next * self.every:
            self._ship(final=False)

    def final(self, status: str) -> None:
        if self.release is not None:
            self.release()
        self._ship(final=True, status=status)

    def _ship(self, final: bool, status: str = "") -> None:
        last = self.w.step // self.every
        indices = list(range(self.next, last + 1))
        self.next = max(self.next, last + 1)
        count = self.bank.loss_count[0]
        mean = self.bank.take_train_loss()
        c = self.ex.counts
        with self.ex.lock:
            snap = {
                "rank": self.w.rank, "indices": indices, "final": final, "status": status,
                "step": self.w.step, "samples": self.bank.samples[0], "wall": self.ex.now(),
                "params": self.w.params.detach().to("cpu", copy=True),
                "buffers": {k: v.detach().to("cpu", copy=True)
                            for k, v in self.bank.buffers_of(0).items()},
                "loss": (mean * count if count else 0.0, count),
                "counters": dict(self.w.counters), "obs_sum": dict(self.w.obs_sum),
                "obs_count": dict(self.w.obs_count),
                "bytes": c.bytes, "messages": c.messages, "wire": c.wire + self.ex.tr.wire_bytes,
                "server_bytes": c.server_bytes, "server_messages": c.server_messages,
                "stall": self.ex.stall, "initial": False,
            }
        if self.initial is not None:
            if self.initial.matches(snap["params"], snap["buffers"]):
                snap.update(params=snap["params"].new_empty(0), buffers={}, initial=True)
            if self.w.step > 0:  # (past the start: the copy is not needed any more)
                self.initial = None
        if not final and self.hold is not None and self.w.step >= self.total:
            self.hold(snap)
        else:
            self.send(snap)


EVAL_NICE = 10  # the evaluator thread's niceness above the process's


def yield_to_training() -> None:
    """Run the calling thread at a lower CPU priority (Linux: ``EVAL_NICE`` more for this
    thread alone; elsewhere nothing). Rank 0's evaluation then takes the cores training
    leaves (waits at collectives, idle cores) instead of slowing rank 0's own steps: a
    slower rank 0 holds up every synchronous round, and an asynchronous run ends with it.
    Measured with 4 processes on 2 cores (MNIST CNN, 40 steps): rank 0 stepped 20-30%
    slower than the others while the first row was evaluated beside its training. The
    queue's backpressure (:meth:`Evaluator.put`) still bounds how far it can fall behind."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid)
                                                + EVAL_NICE, 19))
    except (AttributeError, OSError):  # (no per-thread priority here: evaluate as before)
        pass


class Evaluator:
    """Rank 0: collects snapshots, writes a metrics row per complete evaluation point.

    ``n``: the number of worker ids; ``absent``: ids that are not there at the start (an
    elastic job's ids beyond ``workers``): no row waits for them until they join
    (:meth:`revive`)."""

    def __init__(self, rec: Recorder, n: int, put_timeout_s: float = 120.0,
                 absent: Iterable[int] = ()) -> None:
        self.rec, self.n = rec, n
        self.put_timeout = put_timeout_s
        self.q: queue.Queue = queue.Queue(maxsize=8 * n + 16)  # backpressure on senders
        self.by_index: dict[int, dict[int, dict]] = {}
        self.finals: dict[int, dict] = {}
        self.dead: set[int] = set(absent)  # (and ids not yet joined: revived on "hjoin")
        self.since: dict[int, int] = {}  # a rejoined worker: its first evaluation point
        self.last: dict[int, dict] = {}  # each worker's last recorded snapshot (.elastic_saving)
        self.next_index = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self.on_row: Any = None  # on_row(row, snapshots) after each row (result.json)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="relax-eval")
        self._thread.start()

    def put(self, snap: dict) -> None:
        """Queue a snapshot (waits while the queue is full, up to the put timeout)."""
        try:
            self.q.put(("snap", snap), timeout=self.put_timeout)
        except queue.Full:
            raise WireError("the evaluator is not keeping up (snapshot queue full)") from None

    def mark_dead(self, rank: int, ordered: bool = False) -> None:
        """``rank`` sends no more snapshots (``ordered``: queued now, in the caller's order
        with that worker's snapshots: a message of its own, on its link's reader thread)."""
        if ordered:
            self._put_now(("dead", rank))
        else:  # (the transport's callbacks must not block)
            threading.Thread(target=self.q.put, args=(("dead", rank),), daemon=True).start()

    def revive(self, rank: int, from_index: int) -> None:
        """A (re)joined worker ships snapshots again, from evaluation ``from_index`` on
        (the points before it are recorded without it). Queued now, by the reader of its
        link, so in order with its snapshots: a revive overtaken by its final snapshot
        dropped that final (seen with a scripted rejoin 60 ms before the end)."""
        self._put_now(("revive", (rank, from_index)))

    def _put_now(self, item: tuple) -> None:
        try:
            self.q.put(item, timeout=self.put_timeout)
        except queue.Full:
            raise WireError("the evaluator is not keeping up (its queue is full)") from None

    def stop(self, timeout: float) -> None:
        """Record what is complete, then stop (interrupted or failed runs)."""
        try:
            self.q.put(("stop", None), timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def wait(self, timeout: float) -> bool:
        return self.finished.wait(timeout)

    def _loop(self) -> None:
        yield_to_training()
        try:
            while True:
                kind, item = self.q.get()
                if kind == "stop":
                    self._flush()
                    return
                if kind == "dead":
                    self.dead.add(item)
                elif kind == "revive":
                    self.dead.discard(item[0])
                    self.since[item[0]] = item[1]
                    self.finals.pop(item[0], None)
                else:
                    for e in item["indices"]:
                        self.by_index.setdefault(e, {})[item["rank"]] = item
                    if item["final"]:
                        self.finals[item["rank"]] = item
                self._flush()
                if all(r in self.finals or r in self.dead for r in range(self.n)):
                    if self.finals and any(not s["indices"] for s in self.finals.values()):
                        self._record(list(self.finals.values()))
                    self.finished.set()
                    return
        except BaseException as e:  # noqa: BLE001 - reported by the runtime
            self.error = e
            self.finished.set()

    def _flush(self) -> None:
        while True:
            have = self.by_index.get(self.next_index)
            if not have:
                return
            need = [r for r in range(self.n) if r in have or (
                r not in self.dead and self.since.get(r, 0) <= self.next_index)]
            if any(r not in have for r in need):
                return
            self._record(list(have.values()))
            del self.by_index[self.next_index]
            self.next_index += 1

    def _record(self, snaps: list[dict]) -> None:
        snaps = sorted(snaps, key=lambda s: s["rank"])
        self.last.update((s["rank"], s) for s in snaps)
        X = torch.stack([s["params"] for s in snaps])
        bufs = snaps[0]["buffers"]
        mean_buffers = {k: (torch.stack([s["buffers"][k] for s in snaps]).mean(0)
                            if v.is_floating_point() else v) for k, v in bufs.items()}
        per = [s["bytes"] for s in snaps]
        comm = CommStats(bytes_total=sum(per) + sum(s["server_bytes"] for s in snaps),
                         bytes_per_worker_max=max(per),
                         messages_total=sum(s["messages"] + s["server_messages"]
                                            for s in snaps),
                         stall_mean=sum(s["stall"] for s in snaps) / len(snaps))
        lsum = sum(s["loss"][0] for s in snaps)
        lcount = sum(s["loss"][1] for s in snaps)
        for s in snaps:  # a snapshot serving several points counts its loss once
            s["loss"] = (0.0, 0)
        wall = max(s["wall"] for s in snaps)
        row = self.rec.record(step=sum(s["step"] for s in snaps) / len(snaps),
                        samples=sum(s["samples"] for s in snaps), virtual_time=wall,
                        wall_time=wall, X=X, mean_buffers=mean_buffers, w0_buffers=bufs,
                        comm=comm, train_loss=lsum / lcount if lcount else float("nan"),
                        extra=aggregate_worker_metrics([_Proxy(s) for s in snaps]),
                        buffers_of=lambda k: snaps[k]["buffers"],
                        live_workers=len(snaps))  # (the workers that took part here)
        if self.on_row is not None:
            self.on_row(row, snaps)
