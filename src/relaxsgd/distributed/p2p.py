"""Point-to-point effects of the executor (Send, Recv, Exchange) and the messages behind them.

:class:`PointToPoint` is the half of :class:`~.executor.Executor` that talks to single
peers: it issues ``msg``/``xreq`` messages, answers ``xreq`` with the algorithm's
``on_exchange`` (at once, or at the next step boundary for :class:`Deferred`), matches
``msg`` to Recv by ``(src, tag)`` (:class:`relaxsgd.mailbox.Mailbox`, the simulator's
matching too), and answers progress probes (``status?``).

Bounded tables. Every table that a peer's messages fill is bounded or forgets: an
exchange that timed out leaves ``pending`` (a late answer is ignored, its id unknown);
empty inbox and waiter queues are deleted; a peer with more than :data:`MAX_INBOX`
messages nobody received, or :data:`MAX_DEFERRED` deferred requests, is dropped as lost;
progress answers are kept only for a probe under way. A peer that does not answer an
Exchange within ``RELAXSGD_PEER_TIMEOUT`` (a Recv: ``RELAXSGD_TIMEOUT``) is treated as
lost from then on: later effects with it fail at once, so an asynchronous algorithm goes
on at full speed among the others (a frozen process costs one timeout, not one per try).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..algorithms.base import Deferred, Exchange, PeerUnavailable, Recv, Reply, Send
from ..devices import move, to_host_tree
from ..mailbox import Mailbox
from .collectives import DHandle
from .transport import PeerLost, Transport

MAX_INBOX = 4096
MAX_DEFERRED = 256
PROBE_EVERY_S = 1.0


class PointToPoint:
    """Mixin of :class:`~.executor.Executor`: needs ``tr``, ``lock``, ``w``, ``algo``,
    ``opts``, ``counts``, ``ids``, ``busy``, ``finished``, ``coll_seq``, ``abort`` and
    ``device`` (the worker's: where received tensors go)."""

    tr: Transport
    lock: threading.RLock

    def _init_p2p(self) -> None:
        self.deferred: list[tuple[int, int, Any]] = []
        self.pending: dict[int, DHandle] = {}
        # Send/Recv matching (relaxsgd.mailbox), under self.lock; a Recv that timed out
        # (its handle done) is skipped when a message comes
        self.mail: Mailbox[DHandle] = Mailbox(stale=lambda h: h.done)
        self.status_replies: dict[int, dict[int, tuple]] = {}
        self.tr.on_dead.append(self._peer_dead)

    # -- issuing -------------------------------------------------------------------
    def _sent(self, h: DHandle | None, peer: int) -> Any:
        def done(err: BaseException | None) -> None:
            if err is not None and h is not None:
                h.fail(PeerUnavailable(peer, f"sending failed: {err}"))
            elif h is not None and h.label == "send":
                h.resolve(None)
        return done

    def _send(self, eff: Send) -> DHandle:
        h = DHandle("send", peer=eff.peer)
        self.counts.add(eff.nbytes, 1, 0)
        self.tr.send(eff.peer, ("msg", eff.tag, self._outgoing(eff.payload)),
                     self._sent(h, eff.peer))
        return h

    def _recv(self, eff: Recv) -> DHandle:
        key = (eff.src, eff.tag)
        h = DHandle(f"recv from {eff.src}", peer=eff.src,  # a sender may compute first
                    deadline=time.monotonic() + self.opts.timeout_s)
        with self.lock:
            found, payload = self.mail.take(key)
            if found:
                h.resolve(payload)
            elif eff.src in self.tr.dead:
                h.fail(PeerUnavailable(eff.src, self.tr.dead[eff.src]))
            else:
                self.mail.wait(key, h)
        return h

    def _exchange(self, eff: Exchange) -> DHandle:
        rid = next(self.ids)
        h = DHandle(f"exchange with {eff.peer}", peer=eff.peer,
                    deadline=time.monotonic() + self.opts.peer_timeout_s)
        h.rid = rid
        with self.lock:
            self.pending[rid] = h
        self.counts.add(eff.nbytes, 1, 0)
        self.tr.send(eff.peer, ("xreq", rid, self._outgoing(eff.payload)),
                     self._sent(h, eff.peer))
        return h

    def _timed_out(self, h: DHandle, what: str) -> None:
        """``h`` (an exchange or a Recv) passed its deadline: forget it, fail it, and
        treat its peer as lost from now on."""
        with self.lock:
            self.pending.pop(getattr(h, "rid", None), None)
        which = "RELAXSGD_PEER_TIMEOUT" if what.startswith("exchange") else "RELAXSGD_TIMEOUT"
        why = f"nothing from it within the timeout ({what}, {which})"
        h.fail(PeerUnavailable(h.peer if h.peer is not None else -1, why))
        if h.peer is not None:
            self.tr.mark_dead(h.peer, f"it did not answer ({what}) within {which}; "
                              "treated as lost")

    def _reply(self, src: int, rid: int, ans: Reply) -> None:
        if not isinstance(ans, Reply):
            raise TypeError(f"on_exchange must return Reply or Deferred, got {ans!r}")
        self.counts.add(ans.nbytes, 1, 0)
        self.tr.send(src, ("xrep", rid, self._outgoing(ans.payload)))

    # -- the device boundary ---------------------------------------------------------
    # The wire format encodes host memory: a payload of CUDA tensors is copied to pinned
    # host memory before it is handed to the transport (one DMA transfer a tensor), and
    # what arrives is decoded on the CPU and copied once to this worker's device here.
    def _outgoing(self, payload: Any) -> Any:
        return payload if self.device.type == "cpu" else to_host_tree(payload)

    def _incoming(self, payload: Any) -> Any:
        device = self.device
        return payload if device.type == "cpu" else move(payload, device)

    # -- receiving -----------------------------------------------------------------
    def on_message(self, src: int, msg: tuple) -> bool:
        """Handle an executor message from ``src`` (checked by :func:`.wire.check_message`);
        False if it is not one."""
        kind = msg[0]
        if kind in ("xreq", "xrep", "msg"):
            msg = (*msg[:2], self._incoming(msg[2]), *msg[3:])
        if kind == "xreq":
            self._answer(src, msg[1], msg[2])
        elif kind in ("xrep", "xerr"):
            with self.lock:
                h = self.pending.get(msg[1])
                if h is not None and h.peer != src:  # an id of another peer's exchange
                    raise PeerLost(f"answered exchange {msg[1]}, which was sent to {h.peer}")
                self.pending.pop(msg[1], None)
            if h is not None and kind == "xrep":
                h.resolve(msg[2])
            elif h is not None:
                h.fail(RuntimeError(f"worker {src} failed to answer an exchange: {msg[2]}"))
        elif kind == "msg":
            self._deliver(src, (src, msg[1]), msg[2])
        elif kind == "status?":
            self.tr.send(src, ("status", msg[1], self.w.step, self.coll_seq, self.finished))
        elif kind == "status":
            with self.lock:
                got = self.status_replies.get(msg[1])
                if got is not None:  # a probe under way (else late: forgotten)
                    got[src] = msg[2:]
        else:
            return False
        return True

    def _answer(self, src: int, rid: int, payload: Any) -> None:
        try:
            with self.lock:
                ans = self.algo.on_exchange(self.w, src, payload)
                if isinstance(ans, Deferred):
                    if self.busy:
                        if sum(s == src for s, _, _ in self.deferred) >= MAX_DEFERRED:
                            raise PeerLost(f"more than {MAX_DEFERRED} exchanges waiting")
                        self.deferred.append((src, rid, ans.fn))
                        return
                    ans = ans.fn(self.w)
            self._reply(src, rid, ans)
        except PeerLost:
            raise
        except BaseException as e:  # noqa: BLE001 - a handler bug ends this worker
            self.abort = e
            self.tr.send(src, ("xerr", rid, f"{type(e).__name__}: {e}"[:1000]))

    def _deliver(self, src: int, key: Any, payload: Any) -> None:
        with self.lock:
            waiter = self.mail.claim(key)
            if waiter is not None:
                waiter.resolve(payload)
            elif self.mail.held(src) >= MAX_INBOX:
                raise PeerLost(f"more than {MAX_INBOX} messages nobody received")
            else:
                self.mail.hold(key, payload)

    def _peer_dead(self, peer: int, why: str) -> None:
        with self.lock:
            rids = [rid for rid, h in self.pending.items() if h.peer == peer]
            hs = [self.pending.pop(rid) for rid in rids]
            hs += self.mail.drop_waiters(peer)
        for h in hs:
            h.fail(PeerUnavailable(peer, why))

    # -- progress probes -------------------------------------------------------------
    def probe(self, ranks: list[int], wait_s: float) -> dict[int, tuple]:
        """Ask ``ranks`` for (local step, collectives, finished); the answers within
        ``wait_s``."""
        rid = -1 - next(self.ids)
        with self.lock:
            self.status_replies[rid] = {}
        for r in ranks:
            self.tr.send(r, ("status?", rid))
        end = time.monotonic() + wait_s
        while time.monotonic() < end and len(self.status_replies[rid]) < len(ranks):
            time.sleep(0.05)
        with self.lock:
            return self.status_replies.pop(rid)


def finish_together(ex: Any, done_from: set[int]) -> None:
    """Tell every worker this one is done; keep answering until every live one is.

    A worker still running is asked for its progress every second; one that does not
    answer anything for ``RELAXSGD_TIMEOUT`` is declared lost (a frozen process), so this
    ends within that timeout of the last sign of life of every unfinished worker. With
    connections on demand the "done" goes through the store (:meth:`.Transport.tell_done`)
    and nobody is asked before half the timeout has passed (deaths come through the member
    registry meanwhile), so that the end of a sparse job does not open a full mesh.
    """
    tr: Transport = ex.tr
    demand = getattr(tr, "on_demand", False)
    if demand:
        tr.tell_done()
    else:
        for r in range(tr.n):
            if r != tr.rank:
                tr.send(r, ("done",))
    start = time.monotonic()
    last_probe = 0.0
    while True:
        waiting = [r for r in _ids(tr)
                   if r != tr.rank and r not in done_from and r not in tr.dead]
        if demand and waiting:
            done_from |= tr.done_peers(waiting)
            waiting = [r for r in waiting if r not in done_from]
        if not waiting:
            return
        ex._check_abort()
        now = time.monotonic()
        if demand and now - start < ex.opts.timeout_s / 2:
            waiting = []  # (deaths come through the registry meanwhile)
        for r in waiting:
            if now - max(tr.last_heard.get(r, start), start) > ex.opts.timeout_s:
                tr.mark_dead(r, f"it showed no sign of life for {ex.opts.timeout_s:g}s "
                             "(RELAXSGD_TIMEOUT) while this worker waited for it to finish")
        if now - last_probe > PROBE_EVERY_S:
            last_probe = now
            for r in waiting:
                tr.send(r, ("status?", -1))  # any answer is a sign of life
        time.sleep(0.02)


def lost_workers_check(tr: Transport, collectives: int) -> None:
    """A run that issued collectives (a synchronous algorithm: every worker's model is in
    every step) and lost a worker did not complete, whatever the survivors managed."""
    if tr.dead and collectives:
        parts = "; ".join(f"worker {r}: {why}" for r, why in sorted(tr.dead.items()))
        raise PeerLost(f"lost worker(s) {sorted(tr.dead)} in a run with collectives: it "
                       f"cannot complete without them; {parts}")


def tell_abort(tr: Transport, why: str) -> None:
    """Tell every live worker that this one stops (they fail fast, naming it)."""
    for r in _ids(tr):
        if r != tr.rank and r not in tr.dead:
            tr.send(r, ("abort", f"worker {tr.rank}: {why}"[:2000]))


def _ids(tr: Any) -> Any:
    """The ids of the workers ``tr`` knows (an elastic job's ids that never joined are
    not waited for nor told anything; without ``live()``: every id)."""
    live = getattr(tr, "live", None)
    return sorted(live()) if callable(live) else range(tr.n)
