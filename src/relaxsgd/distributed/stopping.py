"""Checkpoints asked for now (a signal, or the wall-clock period): where every worker stops.

A step schedule needs no agreement: every worker knows the positions. A request that
arrives at one moment (SIGTERM from torchrun or the lab, Ctrl-C, ``checkpoint_every:
"10min"``) does, for a synchronous algorithm: every worker must save at its first safe
point at or past ONE common position T (the consistent cut of the checkpoint rule in
:mod:`relaxsgd.algorithms.base`), and no worker may have passed T already. Rank 0 decides:

1. a worker that got the signal tells every worker (``ckask``); rank 0 acts at its next
   safe point (position p0), where it asks every live worker (``ckq``) for the position
   of its last safe point; a worker answers from its message thread at once and, from
   then on, holds at its next safe point until it gets T (holding waits for a message,
   never for a collective, so no worker waits for a held one);
2. T = max(p0, the positions answered, each a little above: that worker may already be
   past its last safe point); rank 0 sends T (``ckgo``, with the signal, 0 for the
   wall-clock period) to every worker;
3. every worker goes on to its first safe point at or past T and saves there
   (:mod:`.saving`); after a signal, every worker then ends (exit 128 + the signal, one
   line naming ``relaxsgd resume``).

If a worker has finished its program when asked, no checkpoint is taken: a signal stops
the run at once, as without checkpoints. Asynchronous algorithms need no agreement: each
worker saves at its own next safe point after the signal (or its own period) and ends.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

from ..errors import StoppedAtCheckpoint
from .process import StopFlag
from .transport import PeerLost

ASK_TIMEOUT_S = 30.0


class Requests:
    """The checkpoint requests of one worker (see the module docstring)."""

    def __init__(self, ex: Any, flag: StopFlag, sync: bool, minutes: float | None,
                 folder: str) -> None:
        self.ex, self.flag, self.sync, self.folder = ex, flag, sync, folder
        self.period = 60.0 * minutes if minutes else None
        self.last = time.monotonic()
        self.asked: int | None = None  # rank 0: a signal number told by another worker
        self.told = False  # this worker's signal was passed on
        self.hold = False  # a ckq arrived: hold at the next safe point until ckgo
        self.target: float | None = None
        self.stop = 0  # the signal after which the run ends at the target
        self.answers: dict[int, tuple[float, bool]] = {}
        self.rids = itertools.count(1)
        self.rid = 0

    # -- the message thread ------------------------------------------------------------
    def on_message(self, src: int, msg: tuple) -> None:
        kind = msg[0]
        with self.ex.lock:
            if kind == "ckask":
                self.asked = self.asked or int(msg[1]) or 1
                if not self.sync and self.target is None:  # asynchronous: stop soon too
                    self.stop, self.target = int(msg[1]), -math.inf
            elif kind == "ckq":
                self.hold = True
                ans = ("ckpos", int(msg[1]), float(self.ex.last_pos), bool(self.ex.finished))
            elif kind == "ckpos" and int(msg[1]) == self.rid:
                self.answers[src] = (float(msg[2]), bool(msg[3]))
            elif kind == "ckgo":
                self.target, self.stop, self.hold = float(msg[1]), int(msg[2]), False
        if kind == "ckq":
            self.ex.tr.send(src, ans)

    # -- the program's thread, at every safe point ----------------------------------------
    def due(self, pos: float) -> bool:
        """Whether this safe point is where a requested checkpoint is taken."""
        ex, signum = self.ex, self.flag.signum
        if signum and not self.told:
            self.told = True
            self._tell(("ckask", signum))
            if not self.sync:
                self.stop, self.target = signum, -math.inf
        timed = self.period is not None and time.monotonic() - self.last >= self.period
        if not self.sync:
            if timed and self.target is None:
                self.target = -math.inf
        elif ex.rank == 0 and self.target is None and (signum or self.asked or timed):
            self._decide(pos, signum or self.asked or 0)
        elif self.hold:
            _wait_until(ex, lambda: not self.hold or 0 in ex.tr.dead,
                        "the checkpoint position from worker 0")
            if self.hold:
                raise PeerLost(f"worker 0 was lost while it chose a checkpoint position: "
                               f"{ex.tr.dead[0]}")
        return self.target is not None and pos >= self.target

    def taken(self, pos: float) -> None:
        """After a requested checkpoint: the run ends (a signal) or goes on."""
        self.target, self.last = None, time.monotonic()
        if self.stop:
            raise StoppedAtCheckpoint(
                f"a checkpoint at local step {self.ex.w.step} of worker {self.ex.rank} is "
                f"saved: continue with 'relaxsgd resume {self.folder}' (under torchrun, "
                "the same number of processes)",
                self.stop)

    def _tell(self, msg: tuple) -> None:
        tr = self.ex.tr
        for r in range(tr.n):
            if r != tr.rank and r not in tr.dead:
                tr.send(r, msg)

    def _decide(self, p0: float, signum: int) -> None:
        """Rank 0: ask every live worker where it is, send the common target."""
        ex, tr = self.ex, self.ex.tr
        with ex.lock:
            self.rid, self.answers = next(self.rids), {}
        live = [r for r in range(tr.n) if r != tr.rank and r not in tr.dead]
        self._tell(("ckq", self.rid))
        _wait_until(ex, lambda: all(r in self.answers or r in tr.dead for r in live),
                    "the workers' positions for a checkpoint")
        if any(done for _, done in self.answers.values()) or ex.finished:
            self._tell(("ckgo", math.inf, 0))  # too late to checkpoint: no one holds
            self.target = math.inf
            if signum:
                raise KeyboardInterrupt
            return
        t = max([p0] + [math.nextafter(p, math.inf) for p, _ in self.answers.values()])
        self._tell(("ckgo", t, signum))
        self.target, self.stop = t, signum


def _wait_until(ex: Any, cond: Any, what: str) -> None:
    """Wait (polling; faults and interrupts still end it) until ``cond()``."""
    end = time.monotonic() + ASK_TIMEOUT_S
    while not cond():
        ex._check_abort()
        if time.monotonic() > end:
            raise PeerLost(f"worker {ex.rank} waited {ASK_TIMEOUT_S:g}s for {what}")
        time.sleep(0.002)
