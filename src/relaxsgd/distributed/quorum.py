"""Quorum collectives of an elastic job, on the job's own authenticated transport.

Why not gloo: a gloo process group breaks for good when one member dies, and a new one
(a new store prefix per membership, as torchft does) needs every member to enter a
barrier, which a worker busy in a long local phase or a restarted one still loading its
data cannot do at once. Here each collective is a round of point-to-point messages
(:mod:`.transport`), so a member change costs nothing to the others.

The protocol of collective number ``k`` (the k-th AllReduce/AllGather of the main
program, the same sequence on every worker; a rejoined worker takes the donor's count):

1. the *leader* is the lowest id among the live workers as this worker knows them
   (``Transport.live()``); every other worker sends it its contribution
   (``("qpart", k, mode, payload)``) and waits for the result;
2. the leader waits until every worker it knows to be live has contributed (or is known
   lost), then takes the *participants*: the contributors still live at that moment
   (a worker lost during round k is dropped from it; one that joined after the round
   started and contributes before it ends takes part, else it joins from round k + 1);
3. below ``min_quorum`` participants it waits up to ``quorum_wait_s`` for (re)joins, then
   fails with one line naming the missing ids; else it combines the contributions in id
   order (mean: the sum divided by the number of participants; gather: a list by worker
   id, ``None`` for non-participants) and sends ``("qres", k, participants, value)`` to
   every participant; it keeps the last :data:`KEEP` results, so a late contribution to
   a finished round gets that round's result at once;
4. when the leader is lost before its result arrived, a worker sends its contribution to
   the next lowest live id; a new leader asks the members it has no contribution from
   (``("qneed", k)``): one that already holds round k's result (the lost leader sent it
   to some before dying) answers with it, and that result is adopted, so every worker
   ends round k with the same value.

A hanging round is broken as soon as its leader is known lost (the transport's ``leave``:
at once for a closed connection, after the peer timeout for a frozen one); a member that
stays live but sends nothing for ``timeout_s`` fails the round naming it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..algorithms.base import AllGather, AllReduce, tensor_nbytes
from ..membership import QuorumLost, quorum_failure, quorum_mean
from .collectives import Counts, DHandle
from .transport import PeerLost

KEEP = 16  # finished rounds whose results are kept for late contributors
MAX_AHEAD = 64  # rounds ahead of this worker's own that a peer may fill (bounded tables)
MEAN, GATHER = 0, 1
SLICE = 0.1


class QHandle(DHandle):
    """The handle of a quorum collective: its own thread enforces its timeouts."""

    __slots__ = ()


class QuorumCollectives:
    """One worker's side of the quorum rounds (see the module docstring).

    ``send(peer, msg)`` sends on the transport; ``live()`` is the set of live ids this
    worker knows (itself included); ``n_max`` is the number of ids (``max_workers``).
    ``on_message`` and ``member_left`` are called by the transport's threads.

    Members. A round waits for the live workers that are *members*: the ``initial`` ids,
    and a (re)joined worker from its first contribution on (a joiner still receiving its
    handover is live but holds no round up: its donor may be waiting in this very round
    for the safe point where it hands over)."""

    def __init__(self, rank: int, n_max: int, send: Callable[[int, tuple], Any],
                 live: Callable[[], frozenset[int]], initial: range | set[int],
                 min_quorum: int = 1, quorum_wait_s: float = 60.0,
                 timeout_s: float = 120.0, stride: int = 1) -> None:
        self.rank, self.n_max = rank, n_max
        self._send, self._live = send, live
        self.min_quorum, self.quorum_wait_s, self.timeout_s = min_quorum, quorum_wait_s, \
            timeout_s
        self.cv = threading.Condition()
        self.parts: dict[int, dict[int, Any]] = {}  # round -> id -> contribution
        self.results: dict[int, tuple[tuple[int, ...], Any]] = {}
        self.members = set(initial) | {rank}
        self.active: set[int] = set()  # rounds under way on this worker
        self.current = 0  # the highest round this worker started
        self.rounds = 0  # rounds completed (led or not)
        # rounds numbered in blocks of ``stride`` (spawns: block = the spawn's number, the
        # rounds of one spawn inside it); the windows below count blocks
        self.stride = stride

    # -- issuing ---------------------------------------------------------------------
    def all_reduce(self, k: int, eff: AllReduce, counts: Counts) -> QHandle:
        """Round ``k``'s mean over its participants of a tensor or a list of tensors."""
        many = isinstance(eff.tensors, (list, tuple))
        ts = list(eff.tensors) if many else [eff.tensors]
        declared = eff.nbytes if eff.nbytes is not None else tensor_nbytes(eff.tensors)
        mine = [t.detach().cpu().reshape(-1).clone() for t in ts]
        h = QHandle("quorum all-reduce", collective=False)

        def finish(value: Any) -> Any:
            parts, flats = value
            self._count(counts, declared, len(parts), sum(tensor_nbytes(f) for f in flats))
            out = [f.view(t.shape).to(t.device) for f, t in zip(flats, ts, strict=True)]
            return out if many else out[0]

        self._start(k, MEAN, mine, h, finish)
        return h

    def all_gather(self, k: int, eff: AllGather, counts: Counts) -> QHandle:
        """Round ``k``'s payloads as a list by worker id (``None``: did not take part)."""
        h = QHandle("quorum all-gather", collective=False)
        if eff.pattern != "ring":
            raise ValueError(f"unknown AllGather pattern {eff.pattern!r}; use ring")

        def finish(value: Any) -> Any:
            parts, got = value
            out: list[Any] = [None] * self.n_max
            for p, item in zip(parts, got, strict=True):
                out[p] = item[0]
            declared = sum(float(item[1]) for item in got)
            m = len(parts)
            counts.add((m - 1) / m * declared, m - 1, 0)
            return out

        self._start(k, GATHER, (eff.payload, float(eff.nbytes)), h, finish)
        return h

    def _count(self, counts: Counts, declared: float, m: int, wire: float) -> None:
        counts.add(2 * (m - 1) / m * declared, 2 * (m - 1), 2 * (m - 1) / m * wire)

    def _start(self, k: int, mode: int, mine: Any, h: QHandle,
               finish: Callable[[Any], Any]) -> None:
        def run() -> None:
            try:
                value = self._round(k, mode, mine)
            except BaseException as e:  # noqa: BLE001 - re-raised where it is waited
                h.fail(e)
                return
            h.finish = lambda: finish(value)
            h.resolve(None)

        threading.Thread(target=run, daemon=True, name=f"relax-quorum{k}").start()

    # -- one round -----------------------------------------------------------------------
    def _round(self, k: int, mode: int, mine: Any) -> tuple[tuple[int, ...], Any]:
        start = time.monotonic()
        first: int | None = None
        sent_to: int | None = None
        with self.cv:
            self.current = max(self.current, k)
            self.active.add(k)
            while True:
                if k in self.results:
                    return self._done(k)
                leader = min(self._expected())
                first = leader if first is None else first
                if leader == self.rank:
                    return self._lead(k, mode, mine, start, took_over=first != self.rank)
                if sent_to != leader:  # first try, or the leader changed: (re)send
                    self._send(leader, ("qpart", k, mode, mine))
                    sent_to = leader
                if time.monotonic() - start > self.timeout_s:
                    raise PeerLost(f"round {k} of the quorum collectives on worker "
                                   f"{self.rank}: no result from its leader, worker "
                                   f"{leader}, within {self.timeout_s:g}s (RELAXSGD_TIMEOUT)")
                self.cv.wait(SLICE)

    def _lead(self, k: int, mode: int, mine: Any, start: float,
              took_over: bool) -> tuple[tuple[int, ...], Any]:
        """Lead round ``k`` (``self.cv`` held): wait for the members, combine, send."""
        got = self.parts.setdefault(k, {})
        got[self.rank] = mine
        asked: set[int] = set()
        below: float | None = None
        while k not in self.results:
            live = self._expected()
            if min(live) != self.rank:  # a lower id (re)joined: it leads from now on
                self.parts.pop(k, None)
                return self._round(k, mode, mine)
            missing = sorted(live - set(got))
            now = time.monotonic()
            if not missing:
                parts = sorted(p for p in got if p in live)
                if len(parts) >= self.min_quorum:
                    self._finish_round(k, mode, parts, got)
                    break
                below = now if below is None else below
                if now - below > self.quorum_wait_s:
                    raise QuorumLost(self._below_line(k, parts))
            else:
                below = None
                for p in missing:  # who may hold a result of the lost leader
                    if (took_over or now - start > 1.0) and p not in asked:
                        asked.add(p)
                        self._send(p, ("qneed", k))
                if now - start > self.timeout_s:
                    raise PeerLost(f"round {k} of the quorum collectives: worker(s) "
                                   f"{missing} sent nothing to its leader, worker "
                                   f"{self.rank}, within {self.timeout_s:g}s "
                                   "(RELAXSGD_TIMEOUT)")
            self.cv.wait(SLICE)
        parts_k, value = self.results[k]
        for p in set(got) - {self.rank}:  # everyone who is waiting for it
            self._send(p, ("qres", k, parts_k, value))
        return self._done(k)

    def _below_line(self, k: int, parts: list[int]) -> str:
        missing = [i for i in range(self.n_max) if i not in parts]
        return quorum_failure(f"collective round {k} (worker {self.rank})", parts, missing,
                              self.min_quorum, self.quorum_wait_s)

    def _finish_round(self, k: int, mode: int, parts: list[int],
                      got: dict[int, Any]) -> None:
        items = [got[p] for p in parts]
        if mode == MEAN:  # the simulator's mean (membership.quorum_mean), in id order
            first = items[0]
            for item in items[1:]:
                if len(item) != len(first) or any(a.shape != b.shape or a.dtype != b.dtype
                                                  for a, b in zip(item, first, strict=True)):
                    raise PeerLost(f"round {k}: the contributions to an all-reduce differ "
                                   "in shape or dtype between workers")
            value: Any = [quorum_mean([item[i] for item in items])
                          for i in range(len(first))]
        else:
            value = items
        self.results[k] = (tuple(parts), value)

    def _done(self, k: int) -> tuple[tuple[int, ...], Any]:
        """Round ``k`` is over here (``self.cv`` held): forget what it no longer needs."""
        self.parts.pop(k, None)
        self.active.discard(k)
        self.rounds += 1
        low = k // self.stride + 1 - KEEP
        for old in [r for r in self.results if r // self.stride < low]:
            del self.results[old]
        for old in [r for r in self.parts if r // self.stride < low]:
            del self.parts[old]
        return self.results[k]

    # -- the transport's side ---------------------------------------------------------
    def on_message(self, src: int, msg: tuple) -> bool:
        """Handle a quorum message (False: not one)."""
        kind = msg[0]
        if kind not in ("qpart", "qres", "qneed"):
            return False
        k = msg[1]
        with self.cv:
            if kind == "qpart":
                payload = _checked(msg[2], msg[3], src, k)
                if k in self.results:  # a late contributor: the round's result
                    self._send(src, ("qres", k, *self.results[k]))
                elif (self.current // self.stride - KEEP <= k // self.stride
                      <= self.current // self.stride + MAX_AHEAD):
                    self.parts.setdefault(k, {})[src] = payload
                else:
                    return True  # out of the window: ignored
                self.members.add(src)  # (re)joined: a member from its first round on
            elif kind == "qres":
                if k not in self.results and k in self.active:
                    self.results[k] = (_parts(msg[2], self.n_max), msg[3])
            elif k in self.results:  # qneed: the asking leader took over; help it
                self._send(src, ("qres", k, *self.results[k]))
            self.cv.notify_all()
        return True

    def member_left(self, worker: int) -> None:
        """``worker`` is lost: its contributions to unfinished rounds are dropped."""
        with self.cv:
            for got in self.parts.values():
                got.pop(worker, None)
            self.members.discard(worker)
            self.cv.notify_all()

    def member_joined(self, worker: int, member: bool = False) -> None:
        """``worker`` is back; ``member``: it counts from now on, before its first
        contribution (a scripted rejoin, .scripted: the survivors know the trace)."""
        with self.cv:
            if member:
                self.members.add(worker)
            self.cv.notify_all()

    def _expected(self) -> set[int]:
        """The live members (``self.cv`` held), this worker included."""
        return (set(self._live()) & self.members) | {self.rank}


def _checked(mode: int, payload: Any, src: int, k: int) -> Any:
    """A contribution's shape: a list of tensors (mean) or (payload, nbytes) (gather)."""
    ok = (mode == MEAN and isinstance(payload, list)
          and all(isinstance(t, torch.Tensor) for t in payload)) or (
        mode == GATHER and isinstance(payload, tuple) and len(payload) == 2
        and isinstance(payload[1], (int, float)))
    if not ok:
        raise PeerLost(f"worker {src} sent a malformed contribution to quorum round {k}")
    return payload


def _parts(parts: Any, n_max: int) -> tuple[int, ...]:
    if not isinstance(parts, tuple) or not all(
            isinstance(p, int) and 0 <= p < n_max for p in parts):
        raise PeerLost("a quorum result with a malformed list of participants")
    return parts
