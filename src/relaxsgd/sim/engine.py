"""The discrete-event engine: runs every worker's program on one virtual clock.

Events are ordered by (virtual time, sequence number), so a run is deterministic for a
seed whatever the machine's speed. Each worker has a main coroutine (its program) and
any coroutines it spawned for background communication.

Local computation (:class:`Compute`, :class:`Grad`) is done eagerly, at the virtual time
it starts: requests that fall at the same time are flushed together, once all events of
that instant are processed, so that the bank can batch them (vmap). The worker is busy
until ``start + duration``; actions that handlers defer to its "next step boundary" run
then. Codec work a program or a handler does (:mod:`relaxsgd.codec_meter`) delays what
follows it: the program's next effect, the handler's reply. Evaluation hooks run between
instants, after all events at the current time and before that instant's computations
are flushed. Exchanges that arrive together at distinct workers are answered by one
batched handler call (:mod:`.p2p`), with the same result (not while codec time is charged).

Checkpoints (the rule is in :mod:`relaxsgd.algorithms.base`). A :class:`Checkpoint` effect
is a safe point; when a checkpoint is due there (``ckpt_at`` reached), the worker waits for
the handles in flight in its ``w.state``, then parks. Once every worker is parked or
finished and nothing is left in flight (no event, computation or collective pending), the
engine calls ``on_checkpoint(engine)`` (the runner saves :meth:`Engine.state_dict` beside
the bank and the workers), then releases the parked workers in rank order. A resumed
engine (:meth:`Engine.run` with ``resume=True``) starts each unfinished worker's program
afresh at the checkpoint's virtual time, in the same order: the two runs then go on
identically.

Churn (leave, rejoin, join, quorum rounds) is :mod:`.churn`'s, active only for a run with
``elastic.churn``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from ..algorithms.base import (
    Algorithm,
    AllGather,
    AllReduce,
    Checkpoint,
    Compute,
    Effect,
    Exchange,
    Grad,
    Handle,
    Members,
    Now,
    Recv,
    Send,
    ServerRound,
    Sleep,
    Spawn,
    Wait,
    tensor_nbytes,
)
from ..bank import Bank
from ..codec_meter import metering
from ..errors import Deadlock, Diverged
from ..mailbox import Mailbox
from ..worker import LocalWorker
from .barrier import CheckpointBarrier
from .churn import ChurnNode, Failed
from .collectives import allgather_cost, allreduce_cost
from .compute import ComputeModel
from .network import Network
from .p2p import PointToPoint
from .server import ServerNode

# The dist runtime's process groups for spawned sub-programs (RELAXSGD_SPAWN_GROUPS's
# default, .distributed.options): each has its own connections, so its own TCP windows
SPAWN_GROUPS = 4


class _Coro:
    __slots__ = ("proc", "gen", "handle", "main", "stall_from", "inc", "group")

    def __init__(self, proc: _Proc, gen: Any, main: bool) -> None:
        self.proc, self.gen, self.main = proc, gen, main
        # the process group its collectives use in the dist runtime: None, the job's;
        # a spawn of the main program, one of SPAWN_GROUPS in turn (TCP windows of their own)
        self.group: int | None = None
        self.inc = proc.inc  # the worker's incarnation: a departed one's events are void
        self.handle = Handle("spawn")
        self.stall_from: float | None = None


class _Proc:
    """Runtime bookkeeping of one simulated worker."""

    def __init__(self, w: LocalWorker) -> None:
        self.w = w
        self.busy_until: float | None = None  # inside a Compute effect until then
        self.deferred: list[Callable[[], None]] = []
        self.mail: Mailbox[Handle] = Mailbox()  # Send/Recv matching (relaxsgd.mailbox)
        self.coll_seq = 0
        self.spawns = 0  # spawns of the main program (their process groups, in turn)
        self.server_seq = 0  # ServerRounds issued: the next one is that round
        self.done = False
        self.finish_time = 0.0
        self.stall = 0.0
        self.bytes_sent = 0
        self.messages = 0
        self.parked: _Coro | None = None  # held at a checkpoint's barrier
        self.last_pos = -math.inf  # position of its latest safe point
        self.live_spawns = 0
        self.inc = 0  # incarnation (churn): +1 when it leaves and when it is handed a state
        self.gone = False  # left, or not (yet) joined (churn)
        self.arriving = False  # a newcomer whose state is on its way (churn)
        self.owed: list[Handle] = []  # exchanges it must answer at its step boundary

    @property
    def inbox(self) -> dict[Any, deque]:
        """The payloads that arrived and no Recv took yet, ``{(src, tag): deque}`` (what a
        checkpoint saves; assigning it restores them)."""
        return self.mail.inbox

    @inbox.setter
    def inbox(self, value: dict[Any, deque]) -> None:
        self.mail.load_inbox(value)


class Engine(CheckpointBarrier, ServerNode, ChurnNode, PointToPoint):
    """Runs an algorithm's worker programs over a bank, a network and a compute model."""

    def __init__(self, algo: Algorithm, workers: list[LocalWorker], bank: Bank,
                 network: Network, compute: ComputeModel,
                 between_instants: Callable[[float], None] | None = None) -> None:
        self.algo, self.bank, self.net, self.compute = algo, bank, network, compute
        self.procs = [_Proc(w) for w in workers]
        self.n = len(workers)
        self.now = 0.0
        self._q: list = []
        self._seq = itertools.count()
        self._pending: list[tuple[_Coro, Effect]] = []
        self._colls: dict[int, dict] = {}
        self.server_bytes = 0
        self.server_messages = 0
        self._init_server(algo, workers)
        self._init_churn()
        self._between = between_instants
        self.ckpt_at: float | None = None  # a safe point at or past this position parks
        self.ckpt_every: float | None = None  # then the next is the next multiple
        self.on_checkpoint: Callable[[Engine], None] | None = None
        self.exchange_batches = 0  # handler calls that answered several exchanges at once

    # -- scheduling ----------------------------------------------------------------
    def at(self, t: float, fn: Callable, *args: Any) -> None:
        heapq.heappush(self._q, (t, next(self._seq), fn, args))

    def _resolve(self, h: Handle, value: Any) -> None:
        h.done, h.value = True, value
        for cb in h.waiters:
            cb(value)
        h.waiters.clear()

    def _resume_later(self, coro: _Coro) -> Callable[[Any], None]:
        return lambda value: self.at(self.now, self._advance, coro, value)

    def run(self, resume: bool = False) -> float:
        """Run to completion; returns the virtual time when the last worker finished.

        ``resume``: the engine's state was loaded (:meth:`load_state_dict`); the programs of
        the unfinished workers start afresh from their saved state."""
        for p in self.procs:
            if not (resume and p.done) and not p.gone:
                self._start(p)
        while True:
            while self._q and self._q[0][0] <= self.now:
                _, _, fn, args = heapq.heappop(self._q)
                # (not while codec time is charged: a batch's handlers may code different
                # amounts, e.g. a fallback chunk, and the charge is per handler)
                if self.batch_exchanges and self.compute.codec is None and (
                        fn == self._answer or fn == self._compute_done):
                    self._batched_run(fn, args)
                else:
                    fn(*args)
            if self._between is not None:
                self._between(self.now)
            if self._pending:
                self._flush_compute()
                continue
            if not self._q:
                if self._barrier_complete():
                    self._checkpoint()
                    continue
                break
            self.now = self._q[0][0]
        stuck = [p for p in self.procs if not p.done and not p.gone]
        if stuck:
            raise Deadlock(self._stuck_message(stuck))
        if not any(p.done for p in self.procs):
            self.all_gone()  # churn: every worker left before any finished
        return max(p.finish_time for p in self.procs)

    def _start(self, p: _Proc) -> None:
        self._advance(_Coro(p, self.algo.program(p.w), main=True), None)

    # -- coroutines ----------------------------------------------------------------
    def _advance(self, coro: _Coro, value: Any) -> None:
        if coro.inc != coro.proc.inc:
            return  # a coroutine of a worker that left since
        if coro.stall_from is not None:
            coro.proc.stall += self.now - coro.stall_from
            coro.stall_from = None
        while True:
            with metering() as work:  # the codecs the program runs before its next effect
                try:
                    eff = (coro.gen.throw(value.exc) if isinstance(value, Failed)
                           else coro.gen.send(value))
                except StopIteration as stop:
                    eff, value = None, stop.value
            coding = self.compute.work_time(coro.proc.w.rank, work)
            if coding > 0:  # what follows the coding waits for it (compute, not a stall)
                self.at(self.now + coding, self._go_on, coro, eff, value)
                return
            if eff is None:
                self._end(coro, value)
                return
            blocked, value = self._dispatch(coro, eff)
            if blocked:
                return

    def _go_on(self, coro: _Coro, eff: Effect | None, value: Any) -> None:
        """After a program's codec time: its effect (or its end), then on as usual."""
        if coro.inc != coro.proc.inc:
            return  # the worker left while coding
        if eff is None:
            self._end(coro, value)
            return
        blocked, value = self._dispatch(coro, eff)
        if not blocked:
            self._advance(coro, value)

    def _end(self, coro: _Coro, value: Any) -> None:
        if coro.main:
            coro.proc.done = True
            coro.proc.finish_time = self.now
        else:
            coro.proc.live_spawns -= 1
        self._resolve(coro.handle, value)

    def _park(self, coro: _Coro, h: Handle, stall: bool = True) -> tuple[bool, Any]:
        if h.done:
            return False, h.value
        if stall and coro.main:
            coro.stall_from = self.now
        h.waiters.append(self._resume_later(coro))
        return True, None

    def _dispatch(self, coro: _Coro, eff: Effect) -> tuple[bool, Any]:
        p = coro.proc
        if isinstance(eff, (Compute, Grad)):
            if not coro.main:
                raise TypeError("local computation belongs in the main program, not a spawn")
            self._pending.append((coro, eff))
            return True, None
        if isinstance(eff, Now):
            return False, self.now
        if isinstance(eff, Members):
            return False, (self.members.members() if self.members is not None
                           else tuple(range(self.n)))
        if isinstance(eff, Sleep):
            h = Handle("sleep")
            self.at(self.now + eff.seconds, self._resolve, h, None)
            return self._park(coro, h, stall=False)
        if isinstance(eff, Wait):
            return self._wait(coro, eff.handles)
        if isinstance(eff, Checkpoint):
            if self.members is not None and self.churn_point(coro):
                return True, None  # the worker left here
            return self._checkpoint_point(coro, eff)
        if isinstance(eff, Spawn):
            child = _Coro(p, eff.program, main=False)
            if coro.main:
                child.group = p.spawns % SPAWN_GROUPS
                p.spawns += 1
            p.live_spawns += 1
            self._advance(child, None)
            return self._park(coro, child.handle) if eff.blocking else (False, child.handle)
        if isinstance(eff, (AllReduce, AllGather)):
            h = self._join_collective(p, eff, coro.group)
        elif isinstance(eff, Send):
            h = self._send(p, eff)
        elif isinstance(eff, Recv):
            h = self._recv(p, eff)
        elif isinstance(eff, Exchange):
            h = self._exchange(p, eff)
        elif isinstance(eff, ServerRound):
            h = self._server_round(p, eff)
        else:
            raise TypeError(f"unknown effect {eff!r}")
        return self._park(coro, h) if eff.blocking else (False, h)

    def _wait(self, coro: _Coro, handles: Any) -> tuple[bool, Any]:
        single = isinstance(handles, Handle)
        hs = [handles] if single else list(handles)
        missing = [h for h in hs if not h.done]
        if not missing:
            return self._waited(hs, single)
        joint = Handle("wait")
        left = [len(missing)]

        def one_done(_: Any) -> None:
            left[0] -= 1
            if left[0] == 0:
                self._resolve(joint, self._waited(hs, single)[1])

        for h in missing:
            h.waiters.append(one_done)
        return self._park(coro, joint)

    @staticmethod
    def _waited(hs: list[Handle], single: bool) -> tuple[bool, Any]:
        failed = [h.value for h in hs if isinstance(h.value, Failed)]
        if failed:  # a lost peer (churn): raised in the program at its Wait
            return False, failed[0]
        return False, hs[0].value if single else [h.value for h in hs]

    # -- computation ---------------------------------------------------------------
    def _flush_compute(self) -> None:
        pending = [(c, e) for c, e in self._pending if c.inc == c.proc.inc]
        self._pending = []
        groups: dict[tuple, list[tuple[_Coro, Effect]]] = {}
        for coro, eff in pending:
            key = ("grad", 1) if isinstance(eff, Grad) else ("compute", eff.steps)
            groups.setdefault(key, []).append((coro, eff))
        for (kind, steps), items in groups.items():
            rows = [c.proc.w.row for c, _ in items]
            if kind == "grad":
                g, loss = self.bank.grads(rows)
                results = [g[j].clone() for j in range(len(rows))]
            else:
                loss = self.bank.local_steps(rows, steps) if steps > 0 else None
                results = [None] * len(rows)
            if loss is not None and loss.numel() and not bool(torch.isfinite(loss).all()):
                j = int((~torch.isfinite(loss)).nonzero()[0])
                w = items[j][0].proc.w
                raise Diverged(w.step, w.rank, float(loss[j]))
            for (coro, _), res in zip(items, results, strict=True):
                p = coro.proc
                end = self.now + self.compute.duration(p.w.rank, max(steps, 0))
                if kind == "compute":
                    p.busy_until = end
                self.at(end, self._compute_done, coro, res, steps if kind == "compute" else 0)

    def _compute_done(self, coro: _Coro, result: Any, steps: int) -> None:
        p = coro.proc
        if coro.inc != p.inc:
            return
        p.busy_until = None
        if steps:
            p.w.note_steps(steps)
        deferred, p.deferred = p.deferred, []
        for fn in deferred:
            fn()
        self._advance(coro, result)

    # -- communication -------------------------------------------------------------
    def _count(self, p: _Proc, nbytes: float, messages: int) -> None:
        p.bytes_sent += int(nbytes)
        p.messages += messages

    def _join_collective(self, p: _Proc, eff: AllReduce | AllGather,
                         group: int | None = None) -> Handle:
        seq = p.coll_seq
        p.coll_seq += 1
        if self.members is not None:
            return self.quorum_join(p, eff, "coll", seq, self.now)
        c = self._colls.setdefault(seq, {"members": {}, "t": 0.0, "group": group})
        h = Handle(f"collective#{seq}")
        c["members"][p.w.rank] = (eff, h)
        c["t"] = max(c["t"], self.now)
        if len(c["members"]) == self.n:
            del self._colls[seq]
            self._complete_collective(seq, c)
        return h

    def _complete_collective(self, seq: int, c: dict) -> None:
        effs = [c["members"][r][0] for r in range(self.n)]
        kinds = {type(e).__name__ + getattr(e, "pattern", "") for e in effs}
        if len(kinds) != 1:
            raise Deadlock(f"collective #{seq} mismatched across workers: {sorted(kinds)}")
        n, e0 = self.n, effs[0]
        if isinstance(e0, AllReduce):
            sizes = [e.nbytes if e.nbytes is not None else tensor_nbytes(e.tensors)
                     for e in effs]
            lat, tx = allreduce_cost(self.net.cfg, n, max(sizes))
            if isinstance(e0.tensors, (list, tuple)):
                value = [torch.stack([e.tensors[k] for e in effs]).mean(0)
                         for k in range(len(e0.tensors))]
            else:
                value = torch.stack([e.tensors for e in effs]).mean(0)
            for r, s in enumerate(sizes):
                self._count(self.procs[r], 2 * (n - 1) / n * s, 2 * (n - 1))
            results = [[v.clone() for v in value] if isinstance(value, list) else value.clone()
                       for _ in range(n)]
            if n == 1:
                results = [value]
        else:
            sizes = [e.nbytes for e in effs]
            payloads = [e.payload for e in effs]
            if e0.pattern != "ring":
                raise ValueError(f"unknown AllGather pattern {e0.pattern!r}; use ring (a "
                                 "parameter server is the ServerRound effect)")
            lat, tx = allgather_cost(self.net.cfg, n, sizes)
            total = sum(sizes)
            for r in range(n):
                self._count(self.procs[r], (n - 1) / n * total, n - 1)
            results = [list(payloads) for _ in range(n)]
        end = self.net.collective(c["t"], lat, tx, conn=("collectives", c["group"]))
        for r in range(n):
            self.at(end, self._resolve, c["members"][r][1], results[r])
