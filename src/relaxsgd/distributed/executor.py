"""Fulfils a worker program's effects with torch.distributed and point-to-point messages.

One :class:`Executor` per process drives the algorithm's program for its one worker; the
same code serves ``relaxsgd run --runtime dist`` (local steps on the bank) and the drop-in
wrapper (local steps are the user's ``optimizer.step()`` calls): :meth:`Executor.advance`
runs the program until it asks for local computation (:class:`Compute`/:class:`Grad`),
which the caller does, bracketed by :meth:`begin_local`/:meth:`end_local`.

Threads and the worker lock. The program's own Python code (between two yields), the
``on_exchange`` handler and deferred actions all run under one lock, so they never
interleave. The lock is NOT held while the main thread computes local steps or waits for
communication: an exchange request that arrives then is answered at once on the
receiving thread from what ``on_exchange`` reads (a published copy; it must not write
``w.params``, which the main thread is updating), or, if it returns :class:`Deferred`,
at the end of the current local effect ("next step boundary"); if the worker is not
computing (waiting, or finished), a deferred action runs at once, as in the simulator.

Collectives. The main program's collectives go on the default process group, in program
order (identical on every rank). A spawned sub-program runs on its own thread; the k-th
spawn of the main program uses process group ``k mod G`` (``RELAXSGD_SPAWN_GROUPS``) and
starts its collectives only after spawn ``k - G`` finished, so every group sees the same
sequence of collectives on every rank whatever the timing. Non-blocking all-reduces use
``async_op=True``; a non-blocking all-gather (two collectives: sizes, then data) runs as
such a spawn. Spawns inside spawns may not issue collectives (their order would depend on
timing).

Point-to-point effects (Send, Recv, Exchange) and their messages are :mod:`.p2p`'s
(:class:`~.p2p.PointToPoint`, a mixin of :class:`Executor`); ServerRound is
:mod:`.server`'s (a parameter server on a thread of rank 0).

Faults. A collective waited for while any worker is known dead fails at once with
:class:`PeerLost` naming it; one that takes longer than ``RELAXSGD_TIMEOUT`` fails naming
the workers that are behind. An Exchange whose peer is dead or silent for
``RELAXSGD_PEER_TIMEOUT`` (a Recv: ``RELAXSGD_TIMEOUT``, since its sender may compute
first) raises :class:`PeerUnavailable` inside the program (counted as
``peer_unavailable``).
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..algorithms.base import (
    Algorithm,
    AllGather,
    AllReduce,
    Checkpoint,
    Compute,
    Effect,
    Exchange,
    Grad,
    Members,
    Now,
    PeerUnavailable,
    Program,
    Recv,
    Send,
    ServerRound,
    Sleep,
    Spawn,
    Wait,
)
from .collectives import Counts, DHandle, all_gather, all_reduce
from .elastic import SPAWN_ROUNDS, live_of
from .p2p import PointToPoint, finish_together, tell_abort
from .quorum import QHandle, QuorumCollectives
from .server import ServerHost, server_round
from .transport import PeerLost, Transport

__all__ = ["Executor", "finish_together", "tell_abort"]

SLICE = 0.1  # seconds between checks while blocked (faults, interrupts)


@dataclass
class _Ctx:
    main: bool
    group: Any = None
    prev: threading.Event | None = None  # the previous user of this spawn group
    nested: bool = False
    label: str = "main program"
    spawn: int = -1  # the main program's spawn number (elastic: its quorum rounds' block)
    seq: int = 0  # collectives this spawn issued


class Executor(PointToPoint):
    """Runs one worker's program; see the module docstring for the threading contract."""

    def __init__(self, algo: Algorithm, w: Any, transport: Transport, opts: Any,
                 spawn_groups: list[Any], device: Any, t0: float | None = None) -> None:
        self.algo, self.w, self.tr, self.opts = algo, w, transport, opts
        self.rank, self.n = transport.rank, transport.n
        self.device = device
        self.lock = threading.RLock()
        self.groups = spawn_groups
        self.counts = Counts()
        self.t0 = time.perf_counter() if t0 is None else t0
        self.busy = False
        self.ids = itertools.count()
        self.spawns = 0
        self.slot_last: list[threading.Event | None] = [None] * max(len(spawn_groups), 1)
        self.coll_seq = 0
        self.stall = 0.0
        self.abort: BaseException | None = None
        self.gen: Program | None = None
        self.finished = False
        self.saver: Any = None  # a .saving.DistCheckpoints when the run checkpoints
        self.last_pos = 0.0  # the position of the main program's last safe point
        self.wall_offset = 0.0  # a resumed run's wall time before its checkpoint
        self.server_seq = 0  # ServerRounds issued (the next one is that round)
        self.server_host: ServerHost | None = None  # rank 0: the parameter server (.server)
        self.quorum: QuorumCollectives | None = None  # an elastic job's collectives (.quorum)
        self.quorum_spawns: QuorumCollectives | None = None  # and its spawns' (stride)
        self.donor: Any = None  # an elastic job's .handover.Donor (served at safe points)
        self.script: Any = None  # a scripted trace's .scripted.ScriptedChurn
        self.away: frozenset[int] = frozenset()  # ids a scripted trace took away (.scripted)
        self._init_p2p()

    # -- the main program ----------------------------------------------------------
    def start(self, program: Program) -> None:
        self.gen = program

    def advance(self, value: Any = None) -> Effect | None:
        """Resume the main program with ``value``; run it to its next Compute/Grad
        (returned) or to its end (None)."""
        assert self.gen is not None
        ctx = _Ctx(main=True)
        exc: BaseException | None = None
        while True:
            self._check_abort()
            try:
                with self.lock:
                    eff = self.gen.throw(exc) if exc is not None else self.gen.send(value)
                    if isinstance(eff, (Compute, Grad)):
                        self.busy = True  # from the yield on: no gap for a handler
            except StopIteration:
                self.finished = True
                return None
            exc = None
            if isinstance(eff, (Compute, Grad)):
                return eff
            try:
                value = self._dispatch(eff, ctx)
            except PeerUnavailable as e:
                exc = self._unavailable(e)

    def begin_local(self) -> None:
        with self.lock:
            self.busy = True

    def end_local(self) -> None:
        """The step boundary: run the deferred answers that arrived meanwhile."""
        with self.lock:
            self.busy = False
            todo, self.deferred = self.deferred, []
            replies = [(src, rid, fn(self.w)) for src, rid, fn in todo]
        for src, rid, ans in replies:
            self._reply(src, rid, ans)

    def now(self) -> float:
        return time.perf_counter() - self.t0 + self.wall_offset

    def live(self) -> frozenset[int]:
        """The live ids this worker knows (itself included), less those a scripted
        trace has taken away (.scripted)."""
        return live_of(self.tr) - self.away

    # -- effects -------------------------------------------------------------------
    def _dispatch(self, eff: Effect, ctx: _Ctx) -> Any:
        if isinstance(eff, (Compute, Grad)):
            raise TypeError("local computation belongs in the main program, not a spawn")
        if isinstance(eff, Now):
            return self.now()
        if isinstance(eff, Members):  # (.elastic: the live set this worker knows)
            return tuple(sorted(self.live()))
        if isinstance(eff, Checkpoint):
            return self._safe_point(eff, ctx)
        if isinstance(eff, Sleep):
            end = time.perf_counter() + eff.seconds
            while (left := end - time.perf_counter()) > 0:
                self._check_abort()
                time.sleep(min(left, SLICE))
            return None
        if isinstance(eff, Wait):
            single = isinstance(eff.handles, DHandle)
            hs = [eff.handles] if single else list(eff.handles)
            vals = [self._block(h, ctx) for h in hs]
            return vals[0] if single else vals
        if isinstance(eff, Spawn):
            h = self._spawn(eff.program, ctx)
            return self._block(h, ctx) if eff.blocking else h
        if isinstance(eff, (AllReduce, AllGather)) and self.quorum is not None:
            h = self._quorum(eff, ctx)
        elif isinstance(eff, AllReduce):
            h = all_reduce(eff, self.n, self._group(ctx), self.counts, self.device)
            self.coll_seq += 1
        elif isinstance(eff, AllGather):
            if eff.blocking or not ctx.main:
                value = all_gather(eff, self.n, self.rank, self._group(ctx), self.counts,
                                   self.device, lambda h: self._block(h, ctx),
                                   self.tr.max_frame)
                self.coll_seq += 1
                if eff.blocking:
                    return value
                h = DHandle("all-gather")
                h.resolve(value)
                return h
            return self._spawn(_gather_program(eff), ctx)
        elif isinstance(eff, Send):
            h = self._send(eff)
        elif isinstance(eff, Recv):
            h = self._recv(eff)
        elif isinstance(eff, Exchange):
            h = self._exchange(eff)
        elif isinstance(eff, ServerRound):
            h = server_round(self, eff)
        else:
            raise TypeError(f"unknown effect {eff!r}")
        return self._block(h, ctx) if eff.blocking else h

    def _quorum(self, eff: AllReduce | AllGather, ctx: _Ctx) -> QHandle:
        """An elastic job's collective: round ``coll_seq`` of the quorum (.quorum)."""
        assert self.quorum is not None
        q = self.quorum
        if ctx.main:
            k, self.coll_seq = self.coll_seq, self.coll_seq + 1
        else:  # a spawn of the main program: round j of block k (their own numbering)
            q = self.quorum_spawns
            if ctx.nested or q is None or ctx.seq >= q.stride:
                raise TypeError("an elastic job runs the collectives of the main program "
                                f"and of its spawns (at most {SPAWN_ROUNDS} each), not of "
                                "a spawn inside a spawn; this algorithm cannot run elastic")
            k, ctx.seq = ctx.spawn * q.stride + ctx.seq, ctx.seq + 1
        if isinstance(eff, AllReduce):
            return q.all_reduce(k, eff, self.counts)
        return q.all_gather(k, eff, self.counts)

    def _safe_point(self, eff: Checkpoint, ctx: _Ctx) -> None:
        """A safe point: save this worker's part when a checkpoint is due (.saving)."""
        if not ctx.main:
            raise TypeError("Checkpoint belongs in the main program, not a spawn")
        pos = float(self.w.step if eff.position is None else eff.position)
        with self.lock:  # (read with it by .stopping's answers)
            self.last_pos = pos
        if self.script is not None and self.script.safe_point(ctx):
            return  # this worker left and came back: its program starts again
        if self.donor is not None and self.donor.due():  # a (re)joiner waits for this one
            self.donor.serve(ctx)
        if self.saver is not None and self.saver.due(pos):
            self.saver.take(self, pos, ctx)

    def _group(self, ctx: _Ctx) -> Any:
        if ctx.nested:
            raise TypeError("the distributed runtime cannot order collectives issued by a "
                            "spawn inside a spawn; issue them from the main program or a "
                            "spawn of it")
        if ctx.prev is not None:  # wait for the previous spawn on this group to finish
            self._wait_event(ctx.prev, ctx, "the previous spawn on its process group")
            ctx.prev = None
        return ctx.group

    def _block(self, h: Any, ctx: _Ctx) -> Any:
        """Wait for a handle; stall time for the main program; faults and timeouts."""
        if not isinstance(h, DHandle):
            raise TypeError(f"Wait expects handles returned by this runtime, got {h!r}")
        t = time.perf_counter()
        try:
            self._wait_event(h.event, ctx, h.label, h)
        finally:
            if ctx.main:
                self.stall += time.perf_counter() - t
        if h.collective and h.error is not None:
            raise self._collective_failed(h, ctx)
        return h.result()

    def _collective_failed(self, h: DHandle, ctx: _Ctx) -> PeerLost:
        """A collective failed (gloo: a connection closed): name the worker(s) lost."""
        end = time.monotonic() + 2.0  # the transport sees the same end of stream
        while not self.tr.dead and time.monotonic() < end:
            time.sleep(0.02)
        if self.tr.dead:
            return PeerLost(self._lost_message(h.label, ctx))
        return PeerLost(self._diagnose(h.label, ctx)
                        + f" (it failed: {str(h.error).splitlines()[0][:200]})")

    def _lost_message(self, what: str, ctx: _Ctx) -> str:
        dead = self.tr.dead
        lost = sorted(r for r, why in dead.items() if not why.startswith("it stopped"))
        stopped = sorted(r for r in dead if r not in lost)
        parts = [f"worker {r}: {dead[r]}" for r in lost + stopped]
        head = (f"lost worker(s) {lost}" if lost else f"worker(s) {stopped} stopped")
        return (f"{head} during a collective ({what}) of the {ctx.label} on worker "
                f"{self.rank}; " + "; ".join(parts))

    def _wait_event(self, ev: threading.Event, ctx: _Ctx, what: str,
                    h: DHandle | None = None) -> None:
        start = time.monotonic()
        while not ev.wait(SLICE):
            self._check_abort()
            now = time.monotonic()
            if h is not None and h.collective and self.tr.dead:
                raise PeerLost(self._lost_message(what, ctx))
            if h is not None and h.deadline is not None and now > h.deadline:
                self._timed_out(h, what)
                return
            if now - start > self.opts.timeout_s and not isinstance(h, QHandle):
                raise PeerLost(self._diagnose(what, ctx))  # (a quorum round: its own)

    def _check_abort(self) -> None:
        if self.abort is not None:
            raise self.abort

    def _unavailable(self, e: PeerUnavailable) -> PeerUnavailable:
        with self.lock:
            self.w.count("peer_unavailable")
        return e

    # -- spawned sub-programs --------------------------------------------------------
    def _spawn(self, program: Program, parent: _Ctx) -> DHandle:
        h = DHandle("spawn")
        done = threading.Event()
        if parent.main:
            k = self.spawns
            self.spawns += 1
            slot = k % len(self.slot_last)
            prev, self.slot_last[slot] = self.slot_last[slot], done
            ctx = _Ctx(False, self.groups[slot] if self.groups else None, prev,
                       label=f"spawn #{k}", spawn=k)
        else:
            ctx = _Ctx(False, nested=True, label=f"{parent.label}/spawn")
        threading.Thread(target=self._run_spawn, args=(program, ctx, h, done), daemon=True,
                         name=f"relax-{ctx.label}").start()
        return h

    def _run_spawn(self, gen: Program, ctx: _Ctx, h: DHandle, done: threading.Event) -> None:
        value: Any = None
        exc: BaseException | None = None
        try:
            while True:
                try:
                    with self.lock:
                        eff = gen.throw(exc) if exc is not None else gen.send(value)
                except StopIteration as stop:
                    h.resolve(stop.value)
                    return
                exc = None
                try:
                    value = self._dispatch(eff, ctx)
                except PeerUnavailable as e:
                    exc = self._unavailable(e)
        except BaseException as e:  # noqa: BLE001 - re-raised where the handle is waited
            h.fail(e)
        finally:
            done.set()

    def _diagnose(self, what: str, ctx: _Ctx) -> str:
        """Which workers hold a collective up: ask everyone's progress (2 s)."""
        live = [r for r in range(self.n) if r != self.rank and r not in self.tr.dead]
        got = self.probe(live, 2.0)
        silent = [r for r in live if r not in got]
        behind = [r for r, (_, seq, _) in got.items() if seq < self.coll_seq]
        parts = []
        if silent:
            parts.append(f"worker(s) {silent} do not answer")
        if behind:
            parts.append("worker(s) " + ", ".join(
                f"{r} (local step {got[r][0]}, {got[r][1]} collectives)" for r in behind)
                + " are behind")
        lost = ", ".join(parts) or "no worker is visibly behind"
        return (f"a collective ({what}) of the {ctx.label} on worker {self.rank} (local step "
                f"{self.w.step}, {self.coll_seq} collectives) did not complete within "
                f"{self.opts.timeout_s:g}s (RELAXSGD_TIMEOUT): {lost}")


def _gather_program(eff: AllGather) -> Program:
    return (yield AllGather(eff.payload, eff.nbytes, eff.pattern, blocking=True))
