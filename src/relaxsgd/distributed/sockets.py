"""Socket helpers of the point-to-point transport: addresses, a bounded send queue, reads.

Kept apart from :mod:`.transport` so that each module stays small; :class:`PeerLost` is
re-exported by :mod:`.transport`, where callers import it from.
"""

from __future__ import annotations

import fcntl
import socket
import ssl
import struct
import termios
import threading
import time
from collections import deque
from typing import Any

from ..errors import RelaxError


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


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` as published in the store (which anyone may write): checked."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or len(host) > 255 or not port.isdigit() or any(
            c.isspace() for c in host) or not 0 < int(port) < 65536:
        raise PeerLost(f"the store holds {text[:80]!r} as a worker's address, not host:port")
    return host, int(port)


class SendQueue:
    """A FIFO bounded in bytes (one item always fits): ``put`` waits for room.

    ``busy``: the consumer took an item and has not called :meth:`item_done` yet; with
    no item queued either the queue is :meth:`idle`, and a producer may write its message
    itself (in order: everything it queued before has been written)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.size = cap, 0
        self.items: deque = deque()
        self.cond = threading.Condition()
        self.busy = False
        self.closed = False  # closed while idle (an idle connection): put refuses

    def close_if_idle(self) -> bool:
        """Close the queue if nothing is queued or being written; True if closed now."""
        with self.cond:
            if self.items or self.busy or self.closed:
                return False
            self.closed = True
            return True

    def idle(self) -> bool:
        with self.cond:
            return not self.items and not self.busy

    def item_done(self) -> None:
        with self.cond:
            self.busy = False

    def put(self, item: Any, size: int, timeout: float, force: bool = False) -> bool | None:
        """Queue ``item``: True, False past ``timeout`` without room, None if the queue was
        closed (``force``: queued at once, even then)."""
        with self.cond:
            if self.closed and not force:
                return None
            end = time.monotonic() + timeout
            while not force and self.items and self.size + size > self.cap:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            self.items.append((item, size))
            self.size += size
            self.cond.notify_all()
            return True

    def get(self) -> Any:
        with self.cond:
            while not self.items:
                self.cond.wait()
            item, size = self.items.popleft()
            self.size -= size
            self.busy = True
            self.cond.notify_all()
            return item


IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)


def send_room(sock: socket.socket) -> int:
    """Bytes that ``sock`` surely takes now without blocking: half its send buffer (the
    kernel counts its own overhead in it) less what is still queued there (Linux
    ``TIOCOUTQ``); 0 where unknown."""
    try:
        buf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        out = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except (OSError, AttributeError, ValueError):
        return 0
    return buf // 2 - out


def send_parts(sock: socket.socket, parts: list) -> None:
    """Write ``parts`` (bytes-like) in order with scatter-gather ``sendmsg``: no joined
    copy, few system calls (TLS sockets, which have no sendmsg: ``sendall`` each)."""
    if isinstance(sock, ssl.SSLSocket):  # small frames in one TLS record
        if sum(memoryview(p).nbytes for p in parts) <= 1 << 16:
            sock.sendall(b"".join(parts))
        else:
            for p in parts:
                sock.sendall(p)
        return
    views = [memoryview(p).cast("B") for p in parts if memoryview(p).nbytes]
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while sent and views:  # drop what went out; keep the rest of a partial buffer
            k = views[0].nbytes
            if sent >= k:
                sent -= k
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def recv_into(conn: socket.socket, buf: Any) -> None:
    """Fill ``buf`` (any writable buffer) from ``conn``; EOFError if it closes first."""
    view = memoryview(buf).cast("B")
    got, k = 0, view.nbytes
    while got < k:
        r = conn.recv_into(view[got:], min(k - got, 1 << 22))
        if r == 0:
            raise EOFError
        got += r


def shut(sock: socket.socket) -> None:
    """Shut both directions of ``sock`` (a blocked reader or writer on it returns)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
