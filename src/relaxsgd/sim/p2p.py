"""The engine's point-to-point messages: Send/Recv, and Exchange answered by a handler.

Contract (a mixin of :class:`~relaxsgd.sim.engine.Engine`): a :class:`Send` occupies the
sender's link (:meth:`Network.p2p`) and is delivered into the receiver's mailbox at its
arrival time; an :class:`Exchange` runs the partner's ``Algorithm.on_exchange`` at its
arrival time (a :class:`Deferred` answer waits for the partner's step boundary when it is
computing) and the reply occupies the partner's link. Under churn (:mod:`.churn`) a message
to a worker that left is lost, and an Exchange with it (or whose deferred answer it owed)
raises ``PeerUnavailable`` in the requester.

Codec time (:mod:`relaxsgd.codec_meter`): a handler's coding delays its reply. Runs that
charge it are not batched (the engine's loop), since the handlers of a batch may code
different amounts (a chunk sent in full precision after a failed decode) and the charge is
per handler.

Batched gossip: exchanges that arrive at the same instant one after the other, at distinct
workers, are answered by one ``Algorithm.on_exchange_batch`` call, whose contract is to
equal one ``on_exchange`` call each in order (a handler touches its own worker only). The
replies then leave in arrival order, so the network's draws and every later event are
those of the one-by-one run; ``Engine.batch_exchanges = False`` is that run (the tests
compare the two). Likewise, before workers whose local steps end at the same instant
resume, an algorithm with an ``on_resume_batch(ws, members)`` hook may prepare their next
tensor work together (SwarmSGD codes their requests ahead, used only for exactly the
inputs they were coded from: :mod:`relaxsgd.algorithms.swarm_prefetch`); the workers then
resume one by one in their usual order. Off with ``batch_exchanges`` and while codec time
is charged.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from ..algorithms.base import (
    Algorithm,
    Deferred,
    Exchange,
    Handle,
    PeerUnavailable,
    Recv,
    Reply,
    Send,
)
from ..codec_meter import CodecWork, metering
from .churn import Failed


class PointToPoint:
    """Mixin: the engine's Send, Recv and Exchange (see the module docstring)."""

    procs: list[Any]
    net: Any
    algo: Algorithm
    now: float
    _q: list
    at: Callable[..., None]
    _resolve: Callable[[Handle, Any], None]
    _count: Callable[[Any, float, int], None]
    compute: Any

    # Exchanges that reach distinct workers at one instant are answered by one
    # Algorithm.on_exchange_batch call (False: one on_exchange call each; the same run)
    batch_exchanges = True
    exchange_batches = 0  # handler calls that answered several exchanges at once
    prefetched = 0  # requests an algorithm coded ahead for workers resuming together
    members: Any
    n: int
    _compute_done: Callable[..., None]

    def _send(self, p: Any, eff: Send) -> Handle:
        left, arrive, tries = self.net.p2p(p.w.rank, eff.nbytes, self.now, eff.peer)
        self._count(p, eff.nbytes * tries, tries)
        h = Handle("send")
        self.at(left, self._resolve, h, None)
        self.at(arrive, self._deliver, self.procs[eff.peer], (p.w.rank, eff.tag), eff.payload)
        return h

    def _deliver(self, q: Any, key: Any, payload: Any) -> None:
        if q.gone and q.w.rank not in getattr(self, "keep_mail", ()):
            return  # it left: the message is lost with it (unless its rejoin is traced)
        waiter = q.mail.deliver(key, payload)
        if waiter is not None:
            self._resolve(waiter, payload)

    def _recv(self, p: Any, eff: Recv) -> Handle:
        key = (eff.src, eff.tag)
        h = Handle(f"recv{key}")
        found, payload = p.mail.take(key)
        if found:
            h.done, h.value = True, payload
        else:
            p.mail.wait(key, h)
        return h

    def _exchange(self, p: Any, eff: Exchange) -> Handle:
        left, arrive, tries = self.net.p2p(p.w.rank, eff.nbytes, self.now, eff.peer)
        self._count(p, eff.nbytes * tries, tries)
        h = Handle(f"exchange->{eff.peer}")
        self.at(arrive, self._answer, self.procs[eff.peer], p, eff.payload, h)
        return h

    def _batched_run(self, fn: Callable, first: tuple) -> None:
        """``fn(*first)`` and the events of the same kind right after it at this instant,
        with their tensor work batched: exchanges answered together (:meth:`_answer_run`)
        or, before workers resume from local steps that end together, the algorithm's
        ``on_resume_batch`` (SwarmSGD codes their requests ahead, exactly)."""
        if fn == self._answer:
            self._answer_run(first)
            return
        hook = getattr(self.algo, "on_resume_batch", None)
        if hook is None:
            fn(*first)
            return
        run = [first]
        while self._q and self._q[0][0] <= self.now and self._q[0][2] == fn:
            run.append(heapq.heappop(self._q)[3])
        # (popped in order: events that these push sort after them, as they would have)
        ws = [coro.proc.w for coro, *_ in run if coro.main and coro.inc == coro.proc.inc]
        if len(ws) > 1:
            members = (self.members.members() if self.members is not None
                       else range(self.n))
            self.prefetched += hook(ws, members)
        for args in run:
            fn(*args)

    def _answer_run(self, first: tuple) -> None:
        """``first`` and the exchanges that arrive right after it at this instant, at
        other workers: their handlers in one :meth:`Algorithm.on_exchange_batch` call,
        then the replies in arrival order. The same events in the same order as one by
        one (events pushed meanwhile sort after them), and distinct workers' handlers
        commute, so the run is unchanged; only the algorithm's tensor work is shared."""
        run, seen = [first], {first[0]}
        while (self._q and self._q[0][0] <= self.now and self._q[0][2] == self._answer
               and self._q[0][3][0] not in seen):
            run.append(heapq.heappop(self._q)[3])
            seen.add(run[-1][0])
        if len(run) == 1 or any(q.gone for q, *_ in run):
            for args in run:  # (one that left fails its requester: one by one)
                self._answer(*args)
            return
        self.exchange_batches += 1
        ws, srcs = [q.w for q, *_ in run], [src.w.rank for _, src, *_ in run]
        payloads = [payload for _, _, payload, _ in run]
        many = getattr(self.algo, "on_exchange_batch", None)  # (duck-typed test algorithms)
        answers = many(ws, srcs, payloads) if many is not None else \
            [self.algo.on_exchange(*a) for a in zip(ws, srcs, payloads, strict=True)]
        for (q, src, _, h), ans in zip(run, answers, strict=True):
            self._answered(q, src, ans, h)

    def _answer(self, q: Any, src: Any, payload: Any, h: Handle) -> None:
        if q.gone:  # counted as the distributed runtime counts it
            src.w.count("peer_unavailable")
            self._resolve(h, Failed(PeerUnavailable(q.w.rank, "it left")))
            return
        with metering() as work:
            ans = self.algo.on_exchange(q.w, src.w.rank, payload)
        self._answered(q, src, ans, h, work)

    def _answered(self, q: Any, src: Any, ans: Reply | Deferred, h: Handle,
                  work: CodecWork | None = None) -> None:
        if isinstance(ans, Deferred):
            fn = ans.fn
            if q.busy_until is not None:
                q.deferred.append(lambda: self._coded_reply(q, src, fn, h))
                q.owed.append(h)
                return
            self._coded_reply(q, src, fn, h, work)
            return
        self._reply_after(q, src, ans, h, work or CodecWork())

    def _coded_reply(self, q: Any, src: Any, fn: Callable[[Any], Reply], h: Handle,
                     before: CodecWork | None = None) -> None:
        """A deferred answer, its codec time with the handler's own."""
        with metering() as work:
            ans = fn(q.w)
        self._reply_after(q, src, ans, h, work.merged(before))

    def _reply_after(self, q: Any, src: Any, ans: Reply, h: Handle,
                     work: CodecWork) -> None:
        """The reply leaves once the responder has coded it (its handler's codec time)."""
        coding = self.compute.work_time(q.w.rank, work)
        if coding > 0:
            self.at(self.now + coding, self._reply, q, src, ans, h)
        else:
            self._reply(q, src, ans, h)

    def _reply(self, q: Any, src: Any, ans: Reply, h: Handle) -> None:
        if h in q.owed:
            q.owed.remove(h)
        left, arrive, tries = self.net.p2p(q.w.rank, ans.nbytes, self.now, src.w.rank)
        self._count(q, ans.nbytes * tries, tries)
        self.at(arrive, self._resolve, h, ans.payload)
