"""Point-to-point messages between the workers of a job, on plain TCP with background threads.

Every worker listens on a port (published in the torch.distributed store) and opens one
connection to every other worker at start (a full mesh: so that the death of any worker is
seen at once by everyone, as an end of stream without a goodbye). Each outgoing connection
has a sender thread with a queue, so sending never blocks the worker's program; each
incoming connection has a reader thread that decodes messages and hands them to
``on_message(src, msg)`` (that is where exchange requests are answered while the main
thread computes). Messages are tuples ``(kind, ...)`` encoded by :mod:`.wire`.

Why not torch RPC or gloo send/recv (see docs/distributed.md): RPC's TensorPipe agent
needs its own rendezvous, its shutdown is a barrier over all workers (a dead worker blocks
everyone's exit) and it adds a pool of 16 threads per process; gloo point-to-point shares
the process group of the collectives, has no per-message timeout, and a dead peer poisons
the whole group. Here every wait has its own timeout, a dead peer is known within
milliseconds and only its own messages fail, and the bytes are counted exactly.
"""

from __future__ import annotations

import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from ..errors import RelaxError
from .wire import HEADER, decode, encode, wire_size

HELLO = struct.Struct("!I")
_STOP = object()


class PeerLost(RelaxError):
    """A worker that a synchronous step needs is gone (or stuck); names the rank(s)."""

    exit_code = 5


def local_address(master_addr: str) -> str:
    """The address of the interface that reaches ``master_addr`` (127.0.0.1 locally)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class Transport:
    """Framed messages to and from every other rank; sending is queued, receiving threaded."""

    def __init__(self, rank: int, n: int, on_message: Callable[[int, Any], None],
                 timeout_s: float, device: torch.device | None = None) -> None:
        self.rank, self.n, self.timeout = rank, n, timeout_s
        self.on_message = on_message
        self.on_dead: list[Callable[[int, str], None]] = []
        self.device = device
        self.dead: dict[int, str] = {}  # rank -> why
        self.wire_bytes = 0
        self.messages = 0
        self._lock = threading.Lock()
        self._queues: dict[int, queue.Queue] = {}
        self._senders: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self._incoming: dict[int, socket.socket] = {}
        self._joined = threading.Condition()
        self._goodbye: set[int] = set()
        self._closing = False

    # -- set-up --------------------------------------------------------------------
    def start(self, store: Any, host: str, prefix: str = "relaxsgd/p2p",
              startup_s: float | None = None) -> None:
        """Listen, publish the address, connect to every peer, wait for theirs (within
        ``startup_s``, default the timeout: workers may start at quite different times)."""
        wait = max(startup_s or 0.0, self.timeout)
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lst.bind((host, 0))
        lst.listen(max(16, self.n))
        self._listener = lst
        threading.Thread(target=self._accept_loop, daemon=True, name="relax-accept").start()
        store.set(f"{prefix}/{self.rank}", f"{host}:{lst.getsockname()[1]}")
        for peer in range(self.n):
            if peer == self.rank:
                continue
            addr = store.get(f"{prefix}/{peer}").decode()
            sock = self._connect(addr, wait)
            q: queue.Queue = queue.Queue()
            self._queues[peer] = q
            t = threading.Thread(target=self._send_loop, args=(peer, sock, q), daemon=True,
                                 name=f"relax-send{peer}")
            t.start()
            self._senders.append(t)
        deadline = time.monotonic() + wait
        with self._joined:
            while len(self._incoming) < self.n - 1:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(self.n)) - {self.rank} - set(self._incoming))
                    raise PeerLost(f"worker(s) {missing} did not connect within "
                                   f"{wait:.0f}s")
                self._joined.wait(min(left, 0.5))

    def _connect(self, addr: str, wait: float) -> socket.socket:
        host, port = addr.rsplit(":", 1)
        deadline = time.monotonic() + wait
        while True:
            try:
                s = socket.create_connection((host, int(port)), timeout=self.timeout)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(HELLO.pack(self.rank))
        return s

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                (src,) = HELLO.unpack(_recv_exact(conn, HELLO.size))
            except OSError:
                conn.close()
                continue
            with self._joined:
                self._incoming[src] = conn
                self._joined.notify_all()
            threading.Thread(target=self._read_loop, args=(src, conn), daemon=True,
                             name=f"relax-read{src}").start()

    # -- sending -------------------------------------------------------------------
    def send(self, peer: int, msg: tuple, done: Callable[[BaseException | None], None]
             | None = None) -> int:
        """Queue ``msg`` for ``peer``; ``done(error)`` runs once it left (or failed).

        Returns the message's size on the wire.
        """
        frames = encode(msg)
        size = wire_size(frames)
        if peer in self.dead:
            if done is not None:
                done(ConnectionError(self.dead[peer]))
            return 0
        with self._lock:
            self.wire_bytes += size
            self.messages += 1
        self._queues[peer].put((frames, done))
        return size

    def _send_loop(self, peer: int, sock: socket.socket, q: queue.Queue) -> None:
        sock.settimeout(self.timeout)
        while True:
            item = q.get()
            if item is _STOP:
                break
            frames, done = item
            err: BaseException | None = None
            if peer in self.dead:
                err = ConnectionError(self.dead[peer])
            else:
                try:
                    _send_frames(sock, frames)
                except OSError as e:
                    err = e
                    self._mark_dead(peer, f"sending to it failed ({e.__class__.__name__})")
            if done is not None:
                done(err)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # -- receiving -----------------------------------------------------------------
    def _read_loop(self, src: int, conn: socket.socket) -> None:
        while True:
            try:
                (size,) = HEADER.unpack(_recv_exact(conn, HEADER.size))
                buf = bytearray(size)
                _recv_into(conn, buf)
            except (OSError, EOFError):
                if src not in self._goodbye and not self._closing:
                    self._mark_dead(src, "its connection closed without a goodbye "
                                    "(process killed or crashed)")
                break
            msg = decode(buf, self.device)
            if msg[0] == "bye":
                with self._joined:
                    self._goodbye.add(src)
                    self._joined.notify_all()
                continue
            self.on_message(src, msg)
        conn.close()

    def _mark_dead(self, peer: int, why: str) -> None:
        with self._lock:
            if peer in self.dead:
                return
            self.dead[peer] = why
        for cb in list(self.on_dead):
            cb(peer, why)
        with self._joined:
            self._joined.notify_all()

    # -- shutdown ------------------------------------------------------------------
    def close(self, wait_s: float = 5.0) -> None:
        """Say goodbye to every live peer, flush, and wait (a little) for their goodbyes."""
        for peer, q in self._queues.items():
            if peer not in self.dead:
                q.put((encode(("bye",)), None))
            q.put(_STOP)
        deadline = time.monotonic() + wait_s
        for t in self._senders:
            t.join(timeout=max(deadline - time.monotonic(), 0.0))
        with self._joined:
            while True:
                missing = set(range(self.n)) - {self.rank} - self._goodbye - set(self.dead)
                left = deadline - time.monotonic()
                if not missing or left <= 0:
                    break
                self._joined.wait(min(left, 0.2))
        self._closing = True
        if self._listener is not None:
            self._listener.close()


def _send_frames(sock: socket.socket, frames: list) -> None:
    total = wire_size(frames)
    if total <= 1 << 16:
        sock.sendall(b"".join(frames))
    else:
        for f in frames:
            sock.sendall(f)


def _recv_exact(conn: socket.socket, k: int) -> bytes:
    buf = bytearray(k)
    _recv_into(conn, buf)
    return bytes(buf)


def _recv_into(conn: socket.socket, buf: bytearray) -> None:
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        r = conn.recv_into(view[got:], min(len(buf) - got, 1 << 22))
        if r == 0:
            raise EOFError
        got += r
