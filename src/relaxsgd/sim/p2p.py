"""The engine's point-to-point messages (Send/Recv, Exchange), as a mixin of
:class:`~.engine.Engine`.

A message leaves the sender's link and arrives after the network's latency
(:meth:`.network.Network.p2p`, retransmissions counted); a Send lands in the receiver's
:class:`~relaxsgd.mailbox.Mailbox`, an Exchange runs the receiver's ``on_exchange`` at
arrival (a :class:`Deferred` answer waits for its next step boundary) and its reply travels
back. Under churn (:mod:`.churn`) a message to a worker that left is lost, and an Exchange
with it (or whose deferred answer it owed) raises ``PeerUnavailable`` in the requester.
"""

from __future__ import annotations

from typing import Any

from ..algorithms.base import Deferred, Exchange, Handle, PeerUnavailable, Recv, Reply, Send
from .churn import Failed


class PointToPoint:
    """Mixin: Send/Recv and Exchange (see the module docstring)."""

    procs: list[Any]
    now: float
    algo: Any
    net: Any
    at: Any
    _resolve: Any
    _count: Any

    def _send(self, p: Any, eff: Send) -> Handle:
        left, arrive, tries = self.net.p2p(p.w.rank, eff.nbytes, self.now)
        self._count(p, eff.nbytes * tries, tries)
        h = Handle("send")
        self.at(left, self._resolve, h, None)
        self.at(arrive, self._deliver, self.procs[eff.peer], (p.w.rank, eff.tag), eff.payload)
        return h

    def _deliver(self, q: Any, key: Any, payload: Any) -> None:
        if q.gone:
            return  # it left: the message is lost with it
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
        left, arrive, tries = self.net.p2p(p.w.rank, eff.nbytes, self.now)
        self._count(p, eff.nbytes * tries, tries)
        h = Handle(f"exchange->{eff.peer}")
        self.at(arrive, self._answer, self.procs[eff.peer], p, eff.payload, h)
        return h

    def _answer(self, q: Any, src: Any, payload: Any, h: Handle) -> None:
        if q.gone:  # counted as the distributed runtime counts it
            src.w.count("peer_unavailable")
            self._resolve(h, Failed(PeerUnavailable(q.w.rank, "it left")))
            return
        ans = self.algo.on_exchange(q.w, src.w.rank, payload)
        if isinstance(ans, Deferred):
            fn = ans.fn
            if q.busy_until is not None:
                q.deferred.append(lambda: self._reply(q, src, fn(q.w), h))
                q.owed.append(h)
                return
            ans = fn(q.w)
        self._reply(q, src, ans, h)

    def _reply(self, q: Any, src: Any, ans: Reply, h: Handle) -> None:
        if h in q.owed:
            q.owed.remove(h)
        left, arrive, tries = self.net.p2p(q.w.rank, ans.nbytes, self.now)
        self._count(q, ans.nbytes * tries, tries)
        self.at(arrive, self._resolve, h, ans.payload)


