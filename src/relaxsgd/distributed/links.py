"""Connections on demand, the part of :class:`~.transport.Transport` that opens few.

With ``on_demand`` (``RELAXSGD_CONNECT=demand``; every elastic job) a worker connects to a
peer on its first send to it (:meth:`.Transport.send`) and closes a connection unused for
``idle_s`` after saying ``idle`` on it (so that the reader does not take the end for a
death). A connection carries messages one way, so on one that a worker only writes to it
would see a death only at its next write: :meth:`Links._watch_links` watches those
sockets, where an acceptor that closes cleanly writes one :data:`GOODBYE` byte; an end
of stream without it is a death. At the end of a run "done" goes through the store
(:meth:`Links.tell_done`), so that a sparse job never opens a full mesh.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from typing import Any

from . import auth as A
from .sockets import PeerLost, SendQueue, parse_address, shut
from .wire import encode

IDLE_S = 30.0  # an on-demand connection unused this long is closed
GOODBYE = b"\x02"  # written by an acceptor on its incoming connections as it closes
STOP = object()  # the sender thread's end


class _Link:
    """One outgoing connection: its socket, frame MAC and number, writer lock, queue."""

    def __init__(self, sock: socket.socket, mac: A.FrameMac, cap: int) -> None:
        self.sock, self.mac, self.seq = sock, mac, 0
        self.wlock = threading.Lock()  # one writer at a time
        self.queue = SendQueue(cap)
        self.last = time.monotonic()  # the last send (idle connections are closed)


class Links:
    """Mixin of :class:`~.transport.Transport`: the outgoing connections (``_links``) and
    their on-demand upkeep. Needs ``_joined``, ``_incoming``, ``_goodbye``, ``_closing``,
    ``_store``, ``_prefix``, ``auth``, ``idle_s``, ``rank``, ``mark_dead`` and ``_write``."""

    _links: dict[int, _Link]
    _incoming: dict[int, socket.socket]
    _goodbye: set[int]
    _closing: bool
    _joined: threading.Condition
    idle_s: float
    auth: Any
    _store: Any
    _prefix: str
    rank: int

    def connections(self) -> int:
        """Open connections, both directions (what connections on demand bound)."""
        with self._joined:
            return len(self._links) + len(self._incoming)


    def _watch_links(self) -> None:
        """Close idle outgoing connections; see an outgoing one's end (its peer's
        goodbye byte, or a death) without waiting for the next write to fail."""
        while not self._closing:
            socks = {link.sock: p for p, link in list(self._links.items())
                     if not self.auth.tls}  # (TLS: no goodbye byte; deaths by writes)
            try:
                ready = select.select(list(socks), [], [], 0.2)[0] if socks else []
            except (OSError, ValueError):
                ready = []  # (a socket closed meanwhile: look again)
            if not socks:
                time.sleep(0.2)
            for s in ready:
                try:
                    got = s.recv(1)
                except OSError:
                    got = b""
                if got == GOODBYE or socks[s] in self._goodbye:
                    self._goodbye.add(socks[s])
                    self._drop_links(socks[s], outgoing_only=True)
                else:
                    if not self._closing and self._links.get(socks[s]) is not None \
                            and not self.said_done(socks[s]):
                        self.mark_dead(socks[s], "its connection closed without a "
                                       "goodbye (process killed or crashed)")
                    self._drop_links(socks[s], outgoing_only=True)
            now = time.monotonic()
            for p, link in list(self._links.items()):
                if now - link.last > self.idle_s:
                    self._close_idle(p, link)

    def _close_idle(self, peer: int, link: _Link) -> None:
        """If nothing is queued on ``link``: say ``idle`` on it and close it."""
        with self._joined:
            if self._links.get(peer) is not link or not link.queue.close_if_idle():
                return
            del self._links[peer]
        with link.wlock:
            self._write(peer, link, encode(("idle",)))
        link.queue.put(STOP, 0, 0.0, force=True)

    def _drop_links(self, peer: int, outgoing_only: bool = False) -> None:
        """Forget ``peer``'s connections (it restarted, or said goodbye): the next send
        opens a new one, to its latest address."""
        with self._joined:
            link = self._links.pop(peer, None)
            conn = None if outgoing_only else self._incoming.pop(peer, None)
            self._goodbye.discard(peer) if not outgoing_only else None
            self._joined.notify_all()
        if link is not None:
            link.queue.closed = True
            link.queue.put(STOP, 0, 0.0, force=True)
            shut(link.sock)
        if conn is not None:
            shut(conn)

    def tell_done(self) -> None:
        """This worker's program is done (on demand: through the store, no connection
        opened; see :func:`.p2p.finish_together`)."""
        self._store.set(f"{self._prefix}/done/{self.rank}", "1")
        self._store.raw.add(self._store.name(f"{self._prefix}/done-count"), 1)

    def said_done(self, peer: int) -> bool:
        """Whether ``peer`` finished its program (:meth:`tell_done`): the end of its
        connections is then the end of the run, not a death. Asked only when a connection
        ends without a goodbye: at a job's end, under load, a finished worker's link was
        seen to end that way, and taking it for a death dropped its final snapshot
        (its reader stopped before reading it)."""
        if not getattr(self, "on_demand", False) or self._store is None:
            return False
        key = f"{self._prefix}/done/{peer}"
        try:  # the signed value, not the key's presence: a forged flag hides no death
            return bool(self._store.check([key])) and self._store.get(key, 1.0) == b"1"
        except Exception:  # noqa: BLE001 - no answer or a forged value: no evidence
            return False

    def done_peers(self, among: list[int]) -> set[int]:
        """Which of ``among`` said :meth:`tell_done` (the store is read only when its
        count moved)."""
        count = int(self._store.raw.add(self._store.name(f"{self._prefix}/done-count"), 0))
        if count == getattr(self, "_done_count", -1):
            return set()
        self._done_count = count
        return {r for r in among if self._store.check([f"{self._prefix}/done/{r}"])}

    def _address(self, peer: int) -> tuple[str, int]:
        """Where ``peer`` listens: its latest registration, else its published address."""
        if self.registry is not None:
            m = self.registry.member(peer)
            if m is not None:
                return parse_address(m[1])
        got = self._store.get(f"{self._prefix}/{peer}")
        return parse_address(got.decode("utf-8", "replace"))

    def _open(self, peer: int, wait: float) -> _Link:
        """The outgoing connection to ``peer``, opened now if there is none (one opener
        at a time per peer); PeerLost if it cannot be."""
        with self._lock:
            gate = self._opening.setdefault(peer, threading.Lock())
        with gate:
            link = self._links.get(peer)
            if link is not None:
                return link
            sock, mac = self._connect(peer, self._address(peer), wait)
            link = _Link(sock, mac, self.queue_bytes)
            with self._joined:
                self._links[peer] = link
                self.opened += 1
            t = threading.Thread(target=self._send_loop, args=(peer, link), daemon=True,
                                 name=f"relax-send{peer}")
            t.start()
            self._senders.append(t)
            return link

    def _connect(self, peer: int, addr: tuple[str, int],
                 wait: float) -> tuple[socket.socket, A.FrameMac]:
        """An authenticated connection to ``peer``; retried until ``wait`` runs out while
        the peer is not listening yet or hangs up before answering (busy with strangers)."""
        deadline = time.monotonic() + wait
        while True:
            s: socket.socket | None = None
            connected = False
            try:
                s = socket.create_connection(addr, timeout=A.HANDSHAKE_S)
                connected = True
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.auth.client_ctx is not None:
                    s = self.auth.client_ctx.wrap_socket(s)
                mac = A.client_handshake(s, self.auth, self.rank, peer, self.n,
                                         self.my_incarnation)
                s.settimeout(self.timeout)
                return s, mac
            except (A.HandshakeError, OSError) as e:
                if s is not None:
                    s.close()
                # (the address is published once listening: refused means gone, not early;
                # a peer that accepted but stays silent is not a worker of this job)
                again = (isinstance(e, TimeoutError) and not connected) or getattr(
                    e, "retry", False)
                if not again or time.monotonic() > deadline:
                    hint = "" if isinstance(e, A.HandshakeError) else \
                        " (it did not answer our handshake: not a worker of this job?)" \
                        if connected else " (during the handshake: see its log)"
                    raise PeerLost(f"cannot connect to worker {peer} at {addr[0]}:"
                                   f"{addr[1]}: {e}{hint}") from None
                time.sleep(0.05 if s is None else 0.5)
