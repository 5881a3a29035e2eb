"""Point-to-point messages between the workers of a job, on TCP with background threads.

Every worker listens on a port (published in the torch.distributed store). A connection
carries messages one way, from the worker that opened it; it is used only after both
sides proved the job secret (:mod:`.auth`), and every frame on it is authenticated (or
TLS-protected). Each outgoing connection has a sender thread with a bounded queue
(backpressure: a send waits while the queue holds :attr:`Transport.queue_bytes`; a peer
that reads nothing for the peer timeout is dropped); each incoming one a reader thread
that checks and decodes messages (:mod:`.wire`) and hands them to ``on_message(src,
msg)`` (that is where exchange requests are answered while the main thread computes).

Connections. By default every worker opens one connection to every other at start (a
full mesh: the death of any worker is seen at once by everyone, as an end of stream
without a goodbye). With ``on_demand`` (``RELAXSGD_CONNECT=demand``; every elastic job) it
opens one on its first send to a peer and closes idle ones (:mod:`.links`): O(n x degree)
in a gossip job; a death reaches the workers without a connection to the dead one
through the member registry in the store (:mod:`.membership`).

Membership (ELASTIC.md's Transport interface, :class:`~.membership.Membership`):
``live()``, ``on_member(callback)``, ``incarnation(worker)``. A restarted worker keeps
its id with a higher incarnation (sent in its handshake): its new connection is admitted
even though the old one is marked lost, the old incarnation is declared lost first, and
anything still arriving on a connection of an older incarnation is dropped.

Robustness. The accept loop survives any input: each new connection gets its own
handshake thread (at most :data:`MAX_HANDSHAKES` at once, each within
:data:`~.auth.HANDSHAKE_S`), and a connection that fails it is closed with one warning
line. A frame longer than ``max_frame`` (the run's largest legitimate message) is refused
from its 8-byte header, before any allocation. Any error on an authenticated connection
(end of stream, a bad MAC, an invalid message) marks its peer dead with the cause and
closes both directions; its messages are ignored from then on.

Why not torch RPC or gloo send/recv (see docs/distributed.md): RPC's TensorPipe agent
needs its own rendezvous, its shutdown is a barrier over all workers (a dead worker blocks
everyone's exit) and it adds a pool of 16 threads per process; gloo point-to-point shares
the process group of the collectives, has no per-message timeout, and a dead peer poisons
the whole group. Here every wait has its own timeout, a dead peer is known within
milliseconds and only its own messages fail, and the bytes are counted exactly.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RelaxError
from . import auth as A
from .links import GOODBYE, IDLE_S, STOP, Links, _Link
from .membership import CLEAN_LEAVE, Membership, Registry
from .receiving import _THREAD, HEADER, Receiving  # noqa: F401 - HEADER: re-exported
from .sockets import PeerLost, SendQueue, send_parts, send_room, shut
from .wire import WireError, encode, wire_size

MAX_HANDSHAKES = 32
MAX_WARNINGS = 20



class Transport(Membership, Links, Receiving):
    """Framed, authenticated messages to and from the other workers; see the module doc.

    ``max_frame``: the largest message body accepted (bytes); ``peer_timeout_s``: how long
    a send may wait for room in a peer's queue before that peer is dropped. Elastic jobs:
    ``n`` is the number of ids (``max_workers``), ``members`` the ids present at start
    (default all), ``incarnation`` this worker's, ``on_demand`` see the module doc.
    """

    def __init__(self, rank: int, n: int, on_message: Callable[[int, Any], None],
                 timeout_s: float, device: torch.device | None = None, *,
                 auth: A.Auth | None = None, max_frame: int = 1 << 30,
                 peer_timeout_s: float | None = None, incarnation: int = 0,
                 members: Any = None, on_demand: bool = False,
                 idle_s: float = IDLE_S) -> None:
        self.rank, self.n, self.timeout = rank, n, timeout_s
        self.peer_timeout = peer_timeout_s or timeout_s
        self.on_message = on_message
        self.on_dead: list[Callable[[int, str], None]] = []
        self.device = device
        self.auth = auth if auth is not None else A.from_env()
        self.max_frame = max_frame
        self.queue_bytes = 2 * max_frame + (1 << 20)
        self.dead: dict[int, str] = {}  # rank -> why
        self.wire_bytes = 0
        self.messages = 0
        self.refused = 0
        self.last_heard: dict[int, float] = {}
        self.on_demand, self.idle_s = on_demand, idle_s
        self.opened = 0  # outgoing connections opened (on demand: how many partners)
        self._lock = threading.Lock()
        self._links: dict[int, _Link] = {}
        self._opening: dict[int, threading.Lock] = {}
        self._senders: list[threading.Thread] = []
        self.inline_send = True  # False: every message through the sender thread
        self.handed_off = 0  # messages that went through a sender thread's queue
        self._listener: socket.socket | None = None
        self._incoming: dict[int, socket.socket] = {}
        self._joined = threading.Condition()
        self._goodbye: set[int] = set()
        self._closing = False
        self._handshakes = threading.Semaphore(MAX_HANDSHAKES)
        self._warned = 0
        self._store: Any = None
        self._prefix = "relaxsgd/p2p"
        self._members_thread: threading.Thread | None = None
        self._init_members(members, incarnation)

    @property
    def _queues(self) -> dict[int, SendQueue]:  # (what tests and benchmark hooks read)
        return {p: link.queue for p, link in self._links.items()}

    # -- set-up --------------------------------------------------------------------
    def start(self, store: Any, host: str, prefix: str = "relaxsgd/p2p",
              startup_s: float | None = None, registry: Registry | None = None) -> None:
        """Listen, publish the address; without ``on_demand`` connect to every peer and
        wait for theirs (within ``startup_s``, default the timeout: workers may start at
        quite different times). ``registry``: the elastic job's member records."""
        wait = max(startup_s or 0.0, self.timeout)
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((host, 0))
        lst.listen(max(64, self.n))
        self._listener = lst
        self._store, self._prefix, self.registry = store, prefix, registry
        self._thread(self._accept_loop, "relax-accept")
        addr = f"{host}:{lst.getsockname()[1]}"
        store.set(f"{prefix}/{self.rank}", addr)
        if registry is not None:
            registry.register(self.rank, self.my_incarnation, addr)
            self._members_thread = self._thread(self._watch_members, "relax-members")
        if self.on_demand:
            self._thread(self._watch_links, "relax-links")
            return
        for peer in sorted(self._known - {self.rank}):
            self._open(peer, wait)
        deadline = time.monotonic() + wait
        with self._joined:
            while len(self._incoming) < len(self._known) - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(self._known - {self.rank} - set(self._incoming))
                    raise PeerLost(f"worker(s) {missing} did not connect within "
                                   f"{wait:.0f}s")
                self._joined.wait(min(left, 0.5))

    def _thread(self, target: Any, name: str) -> threading.Thread:
        t = threading.Thread(target=target, daemon=True, name=name)
        t.start()
        return t

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                conn, addr = self._listener.accept()
            except OSError:
                if self._closing:
                    return
                time.sleep(0.05)  # out of file descriptors, say: try again
                continue
            if not self._handshakes.acquire(blocking=False):
                conn.close()  # too many half-open connections: refuse at once
                self._warn(f"refused a connection from {addr[0]}: too many handshakes")
                continue
            threading.Thread(target=self._admit, args=(conn, addr), daemon=True,
                             name="relax-handshake").start()

    def _admit(self, conn: socket.socket, addr: Any) -> None:
        """Handshake a new connection; on success start its reader. Never raises."""
        src = -1
        # a hard deadline for the whole handshake, TLS included (whose reads each have
        # the socket timeout, so a peer dripping bytes could stretch it): shut it down
        timer = threading.Timer(A.HANDSHAKE_S + 1.0, shut, args=(conn,))
        timer.daemon = True
        timer.start()
        try:
            conn.settimeout(A.HANDSHAKE_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.auth.server_ctx is not None:
                conn = self.auth.server_ctx.wrap_socket(conn, server_side=True)
            src, mac = A.server_handshake(conn, self.auth, self.rank, self.n, self._free)
            inc = mac.peer_incarnation
            # (proven now: a newer incarnation or a joiner may replace what is known)
            self.admit(src, inc, "connected")
            with self._joined:
                if self.on_demand:  # (its idle connection may be closing just now)
                    self._joined.wait_for(lambda: src not in self._incoming, 1.0)
                if not self._free(src, inc) or inc != self._inc.get(src, 0):
                    raise A.HandshakeError(f"claims rank {src}, which is already connected")
                self._incoming[src] = conn
                self._goodbye.discard(src)
                self._joined.notify_all()
            conn.sendall(b"\x01")
            conn.settimeout(None)  # a live peer may be silent for long (asynchrony)
        except Exception as e:  # noqa: BLE001 - any input: refuse the connection, go on
            with self._joined:
                if self._incoming.get(src) is conn:
                    del self._incoming[src]
            conn.close()
            why = "no complete hello in time" if isinstance(e, TimeoutError) else str(e)
            self._warn(f"refused a connection from {addr[0]}:{addr[1]}: {why}"[:300])
            return
        finally:
            timer.cancel()
            self._handshakes.release()
        self._read_loop(src, conn, mac)

    def _free(self, rank: int, inc: int = 0) -> bool:
        """May incarnation ``inc`` of ``rank`` connect (a newer one always may)?"""
        if self._newer(rank, inc):
            return True
        return inc == self._inc.get(rank, 0) and rank not in self.dead and (
            rank not in self._incoming or self.on_demand)

    def _warn(self, text: str) -> None:
        with self._lock:
            self.refused += text.startswith("refused")
            self._warned += 1
            if self._warned > MAX_WARNINGS:
                return
        sys.stderr.write(f"relaxsgd: warning: worker {self.rank} {text}\n")
        sys.stderr.flush()

    # -- sending -------------------------------------------------------------------
    def send(self, peer: int, msg: tuple, done: Callable[[BaseException | None], None]
             | None = None) -> int:
        """Send ``msg`` to ``peer``: written at once by this thread when the connection is
        idle, else queued for its sender thread; ``done(error)`` runs once it left (or
        failed). Opens the connection first if there is none (on demand, or to a restarted
        peer). Waits while the peer's queue is full; drops the peer if it stays full for
        the peer timeout. Returns the message's size on the wire.
        """
        frames = encode(msg)
        size = wire_size(frames)
        if size > self.max_frame:
            raise WireError(f"a {msg[0]!r} message of {size} bytes exceeds the limit of "
                            f"{self.max_frame} (RELAXSGD_MAX_MESSAGE_MB)")
        for _ in range(3):  # (a connection closed as idle just now: open another)
            err = self._unreachable(peer)
            if err is not None:
                if done is not None:
                    done(ConnectionError(err))
                return 0
            try:
                link = self._links.get(peer) or self._open(peer, self.peer_timeout)
            except RelaxError as e:  # (PeerLost; StoreForged: a forged address)
                self.mark_dead(peer, str(e))
                continue
            if self.inline_send and self._write_now(peer, link, frames, done):
                break  # written by this thread: no hand-off to the sender thread
            queued = link.queue.put((frames, done), size, self.peer_timeout)
            if queued:
                self.handed_off += 1
                break
            if queued is None:
                time.sleep(0.01)  # (closed as idle: it leaves the table at once)
                continue
            self.mark_dead(peer, f"it read nothing for {self.peer_timeout:g}s "
                           "(RELAXSGD_PEER_TIMEOUT) while its send queue was full")
        else:
            if done is not None:
                done(ConnectionError(self.dead.get(peer, f"no connection to {peer}")))
            return 0
        link.last = time.monotonic()
        with self._lock:
            self.wire_bytes += size
            self.messages += 1
        return size

    def _unreachable(self, peer: int) -> str | None:
        if peer in self.dead:
            return self.dead[peer]
        if peer == self.rank or peer not in self._known:
            return f"no connection to {peer}"
        return None

    def _write_now(self, peer: int, link: _Link, frames: list, done: Any) -> bool:
        """Write a message on the calling thread when nothing is queued for ``peer``
        and no other thread is writing to it (the common case: no thread hand-off, no
        GIL round trip); False: queue it. The socket's timeout bounds a peer that reads
        nothing, as the queue's does; a reader thread (answering an exchange) writes only
        a frame the socket takes without blocking, so readers never wait on each other."""
        # a reader thread writes only what the socket takes at once: two readers each
        # blocked writing a big answer to the other would wait for each other
        if getattr(_THREAD, "reader", False) and (
                self.auth.tls or wire_size(frames) + 64 > send_room(link.sock)):
            return False
        if not link.wlock.acquire(blocking=False):
            return False
        try:
            if not link.queue.idle() or link.queue.closed:
                return False
            err = self._write(peer, link, frames)
        finally:
            link.wlock.release()
        if done is not None:
            done(err)
        return True

    def _write(self, peer: int, link: _Link, frames: list) -> BaseException | None:
        """One frame to ``peer`` (its write lock held): numbered, tagged, written."""
        if peer in self.dead:
            return ConnectionError(self.dead[peer])
        try:
            self._send_frame(link.sock, link.mac, link.seq, frames)
            link.seq += 1
        except OSError as e:
            self.mark_dead(peer, f"sending to it failed ({e.__class__.__name__})")
            return e
        return None

    def _send_loop(self, peer: int, link: _Link) -> None:
        while True:
            item = link.queue.get()
            if item is STOP:
                break
            frames, done = item
            with link.wlock:
                err = self._write(peer, link, frames)
            link.queue.item_done()
            if done is not None:
                done(err)
        try:
            link.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _send_frame(self, sock: socket.socket, mac: A.FrameMac, seq: int,
                    frames: list) -> None:
        header = HEADER.pack(wire_size(frames))
        parts = [header, *frames]
        if not self.auth.tls:
            parts.append(mac.tag(seq, header, frames))
        send_parts(sock, parts)  # the tensors' own buffers: no joined copy

    def mark_dead(self, peer: int, why: str, publish: bool = True) -> None:
        """Record ``peer`` as lost (first cause wins), close its connections, tell the
        ``on_dead`` and ``on_member`` ("leave") callbacks and, in an elastic job, the
        member registry (unless ``publish`` is False: it was learnt from there)."""
        with self._lock:
            if peer in self.dead:
                return
            self.dead[peer] = why
        if not self._closing:
            for s in (self._incoming.get(peer), getattr(self._links.get(peer), "sock", None)):
                if s is not None:
                    shut(s)
        for cb in list(self.on_dead):
            cb(peer, why)
        self._fire("leave", peer, why)
        if publish and not self._closing:
            self._publish_leave(peer, why)
        with self._joined:
            self._joined.notify_all()

    # -- shutdown ------------------------------------------------------------------
    def close(self, wait_s: float = 5.0) -> None:
        """Say goodbye to every live peer, flush, and wait (a little) for their goodbyes
        (on demand: from the peers connected to this one)."""
        for peer, link in list(self._links.items()):
            if peer not in self.dead:
                frames = encode(("bye",))
                link.queue.put((frames, None), wire_size(frames), 0.0, force=True)
            link.queue.put(STOP, 0, 0.0, force=True)
        deadline = time.monotonic() + wait_s
        for t in self._senders:
            t.join(timeout=max(deadline - time.monotonic(), 0.0))
        with self._joined:
            while True:
                them = set(self._incoming) if self.on_demand else self._known
                missing = them - {self.rank} - self._goodbye - set(self.dead)
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    break
                self._joined.wait(min(left, 0.2))
        self._stop_members(CLEAN_LEAVE)
        self._closing = True
        with self._joined:
            conns = list(self._incoming.values())
        for conn in conns if self.on_demand and not self.auth.tls else []:
            try:  # (the connector's watch reads it as no death)
                conn.sendall(GOODBYE)
            except OSError:
                pass
        if self._listener is not None:
            self._listener.close()
