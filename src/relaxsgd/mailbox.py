"""Send/Recv matching, written once for both runtimes.

A :class:`~relaxsgd.algorithms.base.Send` is matched to a
:class:`~relaxsgd.algorithms.base.Recv` by the key ``(source rank, tag)``, first in first
out on both sides: a payload that arrives with no receiver waiting is held in the inbox
until a Recv takes it; a Recv that finds nothing waits in line until a payload arrives.
The simulator (``sim/engine.py``, one mailbox per worker) and the distributed runtime
(``dist/p2p.py``, one per process, behind the executor's lock) use this one class, so
their matching is the same.

:class:`Mailbox` is plain bookkeeping: no threads, no locks, no time; it never resolves a
receiver itself. :meth:`Mailbox.deliver` returns the receiver that gets a payload (the
caller resolves it, in its own way), :meth:`Mailbox.take` the payload a Recv gets at once.
Empty queues are deleted, so the tables hold only keys with something in them, and
:meth:`Mailbox.held` counts the unreceived payloads of a source (the distributed runtime
bounds it against a flooding peer).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

W = TypeVar("W")  # a waiting receiver: the runtime's handle
Key = tuple[int, Any]  # (source rank, tag)


class Mailbox(Generic[W]):
    """Keyed FIFO of arrived payloads and of waiting receivers, keys ``(src, tag)``.

    ``stale(w)``: a waiting receiver that no longer wants a payload (e.g. its Recv timed
    out) is skipped and forgotten by :meth:`deliver`, which then gives the payload to the
    next one in line or holds it.
    """

    def __init__(self, stale: Callable[[W], bool] | None = None) -> None:
        self.inbox: dict[Key, deque[Any]] = {}
        self.waiters: dict[Key, deque[W]] = {}
        self._held: dict[int, int] = {}  # per source: payloads in the inbox
        self._stale = stale

    # -- the two sides -----------------------------------------------------------------
    def take(self, key: Key) -> tuple[bool, Any]:
        """``(True, payload)``: the oldest payload held under ``key``, removed; else
        ``(False, None)`` (the caller then usually calls :meth:`wait`)."""
        box = self.inbox.get(key)
        if not box:
            return False, None
        payload = box.popleft()
        if not box:
            del self.inbox[key]
        self._count(key[0], -1)
        return True, payload

    def wait(self, key: Key, waiter: W) -> None:
        """``waiter`` waits, behind the others waiting under ``key``, for a payload."""
        self.waiters.setdefault(key, deque()).append(waiter)

    def deliver(self, key: Key, payload: Any) -> W | None:
        """A payload arrived under ``key``: the waiter that gets it (removed from the line;
        the caller resolves it with ``payload``), or None if it was held in the inbox."""
        waiter = self.claim(key)
        if waiter is None:
            self.hold(key, payload)
        return waiter

    # -- the parts of deliver, for a caller that checks a bound in between ---------------
    def claim(self, key: Key) -> W | None:
        """The first waiter under ``key`` that is not stale, removed; None if none."""
        line = self.waiters.get(key)
        if line is None:
            return None
        while line and self._stale is not None and self._stale(line[0]):
            line.popleft()
        waiter = line.popleft() if line else None
        if not line:
            del self.waiters[key]
        return waiter

    def hold(self, key: Key, payload: Any) -> None:
        """Keep ``payload`` under ``key`` until a Recv takes it."""
        self.inbox.setdefault(key, deque()).append(payload)
        self._count(key[0], 1)

    # -- bookkeeping -------------------------------------------------------------------
    def held(self, src: int) -> int:
        """Payloads from ``src`` that arrived and no Recv took yet."""
        return self._held.get(src, 0)

    def drop_waiters(self, src: int) -> list[W]:
        """Remove and return every receiver waiting for ``src`` (e.g. a lost peer: the
        caller fails them), in key order then line order."""
        keys = [k for k in self.waiters if k[0] == src]
        return [w for k in keys for w in self.waiters.pop(k)]

    def load_inbox(self, inbox: dict[Key, deque[Any]]) -> None:
        """Replace the held payloads (a checkpoint's, read back); waiters are untouched."""
        self.inbox = {k: deque(v) for k, v in inbox.items() if v}
        self._held = {}
        for (src, _), box in self.inbox.items():
            self._count(src, len(box))

    def _count(self, src: int, by: int) -> None:
        n = self._held.get(src, 0) + by
        if n:
            self._held[src] = n
        else:
            self._held.pop(src, None)
