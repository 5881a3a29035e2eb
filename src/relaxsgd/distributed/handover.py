"""Live recovery: a (re)joining worker takes its state from a live donor over the transport.

The protocol (ELASTIC.md items 3 and 7), between the joiner J and its donor D (the lowest
live graph neighbour of J for a gossip algorithm, else the lowest live id:
:func:`relaxsgd.membership.donor_for`):

1. J, once its transport is up, sends ``("hask", n)`` to D (n: J's n-th ask);
2. D answers at its next safe point (the main program's ``yield Checkpoint()``, where by
   the checkpoint rule everything it needs is in ``w.state`` and nothing is in flight:
   D first waits for the handles still in ``w.state``, as a checkpoint does), with three
   messages ``("hand", n, part, tree)``: ``"model"`` (its parameters, optimizer state,
   buffers and ``w.step``), ``"state"`` (``w.state`` as the checkpoint's plain-data tree,
   :mod:`relaxsgd.state_tree`), ``"runtime"`` (the executor's counters: collective and
   server round numbers, the safe point's position, the evaluation schedule, the clock);
3. J checks every piece against its own model (names, shapes and dtypes; the transport
   has already refused a frame above the run's message limit before allocating it),
   copies it in, calls ``Algorithm.adopt(w, D)`` and starts ``program(w)`` as on resume:
   its first action is the first thing D did after that safe point.

What J keeps of its own: its data shard and sampler (worker i always trains on shard i),
its own random stream ``w.rng`` and its own counters (metrics of a worker are what it
did). If D is lost before its answer is complete, J asks the next donor.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import torch

from ..membership import donor_for
from ..state_tree import decode, pending_handles
from ..state_tree import encode as plain
from .saving import done_handle
from .transport import PeerLost
from .wire import WireError

PARTS = ("model", "state", "runtime")


class HandoverFailed(PeerLost):
    """No donor handed its state over (every one lost, or none answered in time)."""


# -- the donor's side ----------------------------------------------------------------------

def pack(job: Any) -> list[tuple[str, Any]]:
    """The donor's state as the three parts of the handover (under the worker lock)."""
    ex, bank, w = job.ex, job.bank, job.w
    with ex.lock:
        model = {"X": bank.X[0].detach().cpu().clone(), "M": bank.M[0].detach().cpu().clone(),
                 "V": bank.V[0].detach().cpu().clone(),
                 "buffers": {k: b.detach().cpu().clone() for k, b in bank.buffers_of(0).items()},
                 "step": int(w.step)}
        state = plain(w.state, f"worker {w.rank}'s state")
        runtime = {"coll_seq": ex.coll_seq, "server_seq": ex.server_seq,
                   "spawns": ex.spawns,
                   "last_pos": float(ex.last_pos), "snap_next": int(job.snap.next),
                   "wall": float(ex.now())}
    return [("model", model), ("state", state), ("runtime", runtime)]


class Donor:
    """Asks for a handover that wait for this worker's next safe point (executor side)."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.asks: dict[int, int] = {}  # joiner -> its ask number
        self.lock = threading.Lock()
        self.served = 0

    def ask(self, src: int, n: int) -> None:
        with self.lock:
            self.asks[src] = n

    def due(self) -> bool:
        return bool(self.asks)

    def serve(self, ctx: Any, only: int | None = None) -> None:
        """At a safe point of the main program: settle, pack once, send to every asker
        (``only``: to that one alone; the others' asks wait: .scripted)."""
        ex = self.job.ex
        with ex.lock:
            waiting = pending_handles(ex.w.state)
        for h in waiting:  # results in flight end up in the handles (as at a checkpoint)
            ex._block(h, ctx)
        with self.lock:
            if only is None:
                asks, self.asks = self.asks, {}
            else:
                asks = {only: self.asks.pop(only)} if only in self.asks else {}
        parts = pack(self.job)
        for joiner, n in sorted(asks.items()):
            try:
                for name, tree in parts:
                    self.job.tr.send(joiner, ("hand", n, name, tree))
            except WireError as e:  # (above the message limit): the donor goes on
                sys.stderr.write(f"relaxsgd: warning: worker {self.job.rank} cannot hand "
                                 f"its state to worker {joiner}: {e}\n")
                continue
            self.served += 1


# -- the joiner's side ---------------------------------------------------------------------

class Joiner:
    """Collects one handover (``on_hand`` is called by the transport's reader thread)."""

    def __init__(self, job: Any) -> None:
        self.job = job
        self.cv = threading.Condition()
        self.n = 0
        self.donor: int | None = None
        self.got: dict[str, Any] = {}

    def on_hand(self, src: int, n: int, part: str, tree: Any) -> None:
        with self.cv:
            if src != self.donor or n != self.n or part not in PARTS or part in self.got:
                return  # a late answer of a donor given up on, or a duplicate: ignored
            self.got[part] = tree
            self.cv.notify_all()

    def receive(self, live: Any, neighbors: list[int] | None, timeout_s: float) -> int:
        """Ask donors until one hands over (within ``timeout_s``); apply it; the donor."""
        job, end = self.job, time.monotonic() + timeout_s
        while True:
            others = set(live()) - {job.rank}
            if not others:
                raise HandoverFailed(f"worker {job.rank} rejoined, but no live worker can "
                                     "hand it the job's state")
            donor = donor_for(others, job.rank, neighbors)
            with self.cv:
                self.n += 1
                self.donor, self.got = donor, {}
            job.tr.send(donor, ("hask", self.n))
            with self.cv:
                while len(self.got) < len(PARTS) and donor in live():
                    if time.monotonic() > end:
                        raise HandoverFailed(
                            f"worker {job.rank} rejoined, but its donor, worker {donor}, "
                            f"handed nothing over within {timeout_s:g}s (RELAXSGD_TIMEOUT)")
                    self.cv.wait(0.1)
                if len(self.got) == len(PARTS):
                    got = dict(self.got)
                    break
        apply(job, got)
        return donor


def apply(job: Any, got: dict[str, Any]) -> None:
    """Copy a checked handover into the joiner's bank, worker and executor."""
    ex, bank, w = job.ex, job.bank, job.w
    model, runtime = got["model"], got["runtime"]
    if not isinstance(model, dict) or not isinstance(runtime, dict):
        raise WireError("a malformed handover (its model or runtime part is not a dict)")
    own = {"X": bank.X[0], "M": bank.M[0], "V": bank.V[0]}
    bufs = bank.buffers_of(0)
    theirs = model.get("buffers")
    if not isinstance(theirs, dict) or set(theirs) != set(bufs):
        raise WireError("a handover whose buffers are not this model's")
    pairs = [(own[k], model.get(k), k) for k in own]
    pairs += [(bufs[k], theirs[k], f"buffer {k}") for k in bufs]
    for mine, t, what in pairs:
        if not isinstance(t, torch.Tensor) or t.shape != mine.shape or t.dtype != mine.dtype:
            raise WireError(f"a handover whose {what} is not this model's "
                            f"({getattr(t, 'shape', type(t).__name__)})")
    step = model.get("step")
    if type(step) is not int or not 0 <= step <= bank.total_steps:
        raise WireError(f"a handover at an impossible step {step!r}")
    keys = ("coll_seq", "server_seq", "spawns", "last_pos", "snap_next", "wall")
    if not all(isinstance(runtime.get(k), (int, float)) for k in keys):
        raise WireError("a handover whose runtime counters are not numbers")
    state = decode(got["state"], done_handle, device=w.params.device)
    if not isinstance(state, dict):
        raise WireError("a handover whose w.state is not a dict")
    with ex.lock, torch.no_grad():
        for mine, t, _ in pairs:
            mine.copy_(t)
        bank.steps[0] = step
        w.state.clear()
        w.state.update(state)
        ex.coll_seq, ex.server_seq = int(runtime["coll_seq"]), int(runtime["server_seq"])
        ex.spawns = int(runtime["spawns"])  # (the spawns' quorum rounds are numbered by it)
        ex.last_pos = float(runtime["last_pos"])
        ex.wall_offset = float(runtime["wall"]) - (time.perf_counter() - ex.t0)
        job.snap.next = int(runtime["snap_next"])
