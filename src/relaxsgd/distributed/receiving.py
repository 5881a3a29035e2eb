"""The receiving side of :class:`~.transport.Transport` (a mixin): one reader thread per
incoming connection reads frames, refuses one above ``max_frame`` from its 8-byte header
before allocating, checks each frame's MAC (unless TLS protects the link), decodes and
checks the message (:mod:`.wire`) and hands it to ``on_message``; a ``bye`` or ``idle``
ends a connection without a death, anything else wrong marks the peer dead.
(Split from :mod:`.transport`.)"""

from __future__ import annotations

import hmac
import socket
import struct
import threading
import time
from typing import Any

import torch

from . import auth as A
from .sockets import recv_into
from .wire import WireError, check_message, decode

HEADER = struct.Struct("!Q")  # the length of the body that follows
_THREAD = threading.local()  # .reader: this thread reads a connection (see _write_now)


class Receiving:
    """Mixin of :class:`~.transport.Transport`: its reader threads. Needs ``dead``,
    ``_inc``, ``last_heard``, ``_joined``, ``_goodbye``, ``_incoming``, ``_closing``,
    ``max_frame``, ``auth``, ``device``, ``on_message`` and ``mark_dead``."""

    dead: dict[int, str]
    _inc: dict[int, int]
    last_heard: dict[int, float]
    _joined: threading.Condition
    _goodbye: set[int]
    _incoming: dict[int, socket.socket]
    _closing: bool
    max_frame: int
    auth: A.Auth
    device: Any
    on_message: Any
    mark_dead: Any
    said_done: Any

    def _read_loop(self, src: int, conn: socket.socket, mac: A.FrameMac) -> None:
        _THREAD.reader = True
        seq, inc = 0, mac.peer_incarnation
        while src not in self.dead and self._inc.get(src, 0) == inc:
            try:
                msg = self._read_frame(conn, mac, seq, src)
                seq += 1
                if self._inc.get(src, 0) != inc:
                    break  # from an older incarnation: ignored
                self.last_heard[src] = time.monotonic()
                if msg[0] in ("bye", "idle"):
                    with self._joined:
                        if msg[0] == "bye":
                            self._goodbye.add(src)
                        elif self._incoming.get(src) is conn:
                            del self._incoming[src]
                        self._joined.notify_all()
                    if msg[0] == "idle":
                        break
                    continue
                self.on_message(src, msg)
            except (OSError, EOFError) as e:
                if src not in self._goodbye and not self._closing and \
                        self._inc.get(src, 0) == inc and not self.said_done(src):
                    self.mark_dead(src, "its connection closed without a goodbye "
                                   f"(process killed or crashed; {type(e).__name__})")
                break
            except Exception as e:  # noqa: BLE001 - any bad input drops this peer only
                if not self._closing and self._inc.get(src, 0) == inc:
                    why = str(e) if isinstance(e, WireError) else f"{type(e).__name__}: {e}"
                    self.mark_dead(src, f"it sent an invalid message ({why})"[:400])
                break
        conn.close()

    def _read_frame(self, conn: socket.socket, mac: A.FrameMac, seq: int,
                    src: int) -> tuple:
        header = A.recv_exact(conn, HEADER.size)
        (size,) = HEADER.unpack(header)
        if size > self.max_frame:  # refused before allocating anything
            raise WireError(f"a frame of {size} bytes, above the limit of {self.max_frame} "
                            "(RELAXSGD_MAX_MESSAGE_MB)")
        # straight into a fresh uninitialised buffer (no zero fill, no copy after): the
        # decoded tensors are views of it, owned by the receiver
        buf = memoryview(torch.empty(size, dtype=torch.uint8, device="cpu").numpy())
        recv_into(conn, buf)
        if not self.auth.tls:
            tag = A.recv_exact(conn, mac.size)
            if not hmac.compare_digest(tag, mac.tag(seq, header, [buf])):
                raise WireError("a frame failed authentication (garbled, replayed or "
                                "forged)")
        return check_message(decode(buf, self.device))
