"""The engine's checkpoint barrier and its state, as a mixin of :class:`~.engine.Engine`.

See "Checkpoints" in :mod:`relaxsgd.algorithms.base` for the rule and
:mod:`relaxsgd.sim.engine` for how a barrier fits in the event loop: a worker whose safe
point is at or past ``ckpt_at`` waits for the handles in flight in its ``w.state``, then
parks; once every worker is parked or finished and nothing is in flight, the engine calls
``on_checkpoint(engine)`` and releases the parked workers in rank order.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from ..algorithms.base import Checkpoint, Handle
from ..checkpoint import next_position
from ..errors import Deadlock
from ..state_tree import decode, encode, pending_handles


class CheckpointBarrier:
    """Checkpoint barrier and ``state_dict``; needs the engine's procs, queue and models."""

    procs: list[Any]
    n: int
    now: float
    algo: Any
    net: Any
    compute: Any
    server_bytes: int
    server_messages: int
    _colls: dict[int, dict]
    _rounds: dict[int, dict]
    server_state: dict[str, Any] | None
    ckpt_at: float | None
    ckpt_every: float | None
    on_checkpoint: Any

    def _advance(self, coro: Any, value: Any) -> None:  # the engine's
        raise NotImplementedError

    def _stuck_message(self, stuck: list[Any]) -> str:
        parked = [p.w.rank for p in stuck if p.parked is not None]
        other = [p for p in stuck if p.parked is None]
        if parked and other:
            p = other[0]
            return (f"a checkpoint never completed at t={self.now:.6f}s: worker(s) {parked} "
                    f"wait at their safe points while worker {p.w.rank} (local step "
                    f"{p.w.step}) waits for one of them; algorithm {self.algo.name!r} places "
                    "its Checkpoint positions where they do not form a consistent cut")
        p = stuck[0]
        return (f"simulation stuck at t={self.now:.6f}s: {len(stuck)} worker(s) never "
                f"finished (first: worker {p.w.rank} at local step {p.w.step}, "
                f"{p.coll_seq} collectives issued); an algorithm waits for something no "
                "one sends")

    # -- checkpoints ---------------------------------------------------------------
    def request_checkpoint(self) -> None:
        """Take a checkpoint as soon as possible: at every worker's next safe point."""
        live = [p.last_pos for p in self.procs if not p.done]
        if live:
            at = math.nextafter(max(live), math.inf)
            self.ckpt_at = at if self.ckpt_at is None else min(self.ckpt_at, at)

    def _checkpoint_point(self, coro: Any, eff: Checkpoint) -> tuple[bool, Any]:
        if not coro.main:
            raise TypeError("Checkpoint belongs in the main program, not a spawn")
        p = coro.proc
        pos = float(p.w.step if eff.position is None else eff.position)
        p.last_pos = pos
        if self.ckpt_at is None or pos < self.ckpt_at:
            return False, None
        coro.stall_from = self.now
        waiting = pending_handles(p.w.state)
        if not waiting:
            p.parked = coro
            return True, None
        left = [len(waiting)]

        def one_done(_: Any) -> None:  # every result is in: hold the worker at the barrier
            left[0] -= 1
            if left[0] == 0:
                p.parked = coro

        for h in waiting:
            h.waiters.append(one_done)
        return True, None

    def _barrier_complete(self) -> bool:
        if not any(p.parked is not None for p in self.procs):
            return False
        if not all(p.done or p.parked is not None for p in self.procs):
            return False
        busy = [p.w.rank for p in self.procs if p.live_spawns]
        if busy or self._colls or self._rounds:
            raise Deadlock(f"a checkpoint cannot be taken: worker(s) {busy} still run a "
                           f"sub-program (or {len(self._colls)} collective(s) are "
                           f"unfinished) at their safe point; algorithm {self.algo.name!r} "
                           "must keep the handle of every spawn in w.state")
        return True

    def _checkpoint(self) -> None:
        parked = [p for p in self.procs if p.parked is not None]
        for p in parked:  # the wait at the barrier is stall, counted before saving
            assert p.parked is not None and p.parked.stall_from is not None
            p.stall += self.now - p.parked.stall_from
            p.parked.stall_from = None
        top = max(p.last_pos for p in parked)
        self.ckpt_at = next_position(self.ckpt_every, top) if self.ckpt_every else None
        if self.on_checkpoint is not None:
            self.on_checkpoint(self)
        for p in parked:
            coro, p.parked = p.parked, None
            self._advance(coro, None)

    def state_dict(self) -> dict[str, Any]:
        """The engine's state at a checkpoint (plain data; see :mod:`relaxsgd.state_tree`)."""
        procs = [{"done": p.done, "finish_time": p.finish_time, "stall": p.stall,
                  "bytes_sent": p.bytes_sent, "messages": p.messages,
                  "coll_seq": p.coll_seq, "server_seq": p.server_seq, "spawns": p.spawns,
                  "last_pos": p.last_pos,
                  "inbox": encode([(k, list(v)) for k, v in p.inbox.items() if v],
                                  f"worker {p.w.rank}'s inbox")}
                 for p in self.procs]
        return {"now": self.now, "server_bytes": self.server_bytes,
                "server_messages": self.server_messages, "ckpt_at": self.ckpt_at,
                "procs": procs, "link_free": list(self.net.link_free),
                "server_in_free": self.net.server_in_free,
                # TCP windows (initial_window_B): [key, window, last sent]
                "net_windows": [[list(k), w, t] for k, (w, t) in self.net.windows.items()],
                "server": encode(self.server_state, "the parameter server's state"),
                "net_rng": encode(self.net.rng.getstate()),
                "compute_rngs": [encode(r.getstate()) for r in self.compute.rngs]}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a freshly built engine of the same run."""
        if len(s["procs"]) != self.n or len(s["compute_rngs"]) != self.n:
            raise ValueError(f"the checkpoint has {len(s['procs'])} workers, the run {self.n}")
        self.now = float(s["now"])
        self.server_bytes, self.server_messages = s["server_bytes"], s["server_messages"]
        self.ckpt_at = s["ckpt_at"]
        for p, q in zip(self.procs, s["procs"], strict=True):
            p.done, p.finish_time, p.stall = bool(q["done"]), q["finish_time"], q["stall"]
            p.bytes_sent, p.messages = q["bytes_sent"], q["messages"]
            p.coll_seq, p.last_pos = q["coll_seq"], q["last_pos"]
            p.server_seq = int(q["server_seq"])
            p.spawns = int(q.get("spawns", 0))
            p.inbox = {tuple(k) if isinstance(k, list) else k: deque(v)
                       for k, v in decode(q["inbox"], done_handle)}
        self.net.link_free = [float(x) for x in s["link_free"]]
        self.net.server_in_free = float(s["server_in_free"])
        self.net.windows = {tuple(k): (float(w), float(t))
                            for k, w, t in s.get("net_windows", [])}
        self.server_state = decode(s["server"], done_handle)
        self.net.rng.setstate(_random_state(decode(s["net_rng"], done_handle)))
        for r, st in zip(self.compute.rngs, s["compute_rngs"], strict=True):
            r.setstate(_random_state(decode(st, done_handle)))


def done_handle(value: Any) -> Handle:
    h = Handle("restored")
    h.done, h.value = True, value
    return h


def _random_state(s: Any) -> tuple:
    """A ``random.Random`` state read back from a checkpoint (lists become tuples)."""
    version, internal, gauss = s
    return (int(version), tuple(int(x) for x in internal), gauss)

