"""The simulator's checkpoints: the schedule, the stop signals, the file, the restore.

:class:`SimCheckpoints` is what :func:`relaxsgd.run.simulate` plugs into the engine: it
sets the engine's checkpoint positions from ``checkpoint_every``, asks for a checkpoint
when the wall-clock period has passed or the user stopped the run (first Ctrl-C or
SIGTERM: the workers go on to their next safe point, then everything is saved and the run
ends; a second signal stops at once, as before), and writes the file
(:mod:`relaxsgd.checkpoint`). :meth:`SimCheckpoints.restore` puts a checkpoint back into a
freshly built run before :meth:`Engine.run(resume=True) <relaxsgd.sim.engine.Engine.run>`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import checkpoint as ckpt
from ..errors import StoppedAtCheckpoint
from .barrier import done_handle


class StopSignals:
    """First SIGINT/SIGTERM: remember it (the run checkpoints and ends); second: stop now."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self, enabled: bool) -> Iterator[StopSignals]:
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, _frame: Any) -> None:
            if self.signum is not None:  # the second one: stop at once
                raise KeyboardInterrupt
            self.signum = signum
            name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
            sys.stderr.write(f"\nrelaxsgd: {name}: going on to the workers' next safe point "
                             "to save a checkpoint (Ctrl-C again to stop at once)\n")

        for s in previous:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class SimCheckpoints:
    """Checkpoint schedule and file of one simulated run (see the module docstring)."""

    def __init__(self, every: Any, out: str | None, resolved: dict[str, Any],
                 state: Callable[[], dict[str, Any]]) -> None:
        self.every = ckpt.parse_every(every)
        self.path = os.path.join(out, ckpt.FILE) if out else None
        self.resolved = resolved
        self.state = state  # the run's part: rows, counters, wall time
        self.signals = StopSignals()
        self.asked = False
        self.last_wall = time.monotonic()
        self.saved = 0

    def attach(self, engine: Any, resumed: bool) -> None:
        engine.on_checkpoint = self._take
        if self.every is not None and self.every[0] == "steps":
            engine.ckpt_every = self.every[1]
            if not resumed:
                engine.ckpt_at = self.every[1]
        self.engine = engine

    def poll(self) -> None:
        """Between instants: ask for a checkpoint when one is wanted now."""
        if self.asked or self.path is None:
            return
        wall = self.every is not None and self.every[0] == "minutes" and \
            time.monotonic() - self.last_wall >= 60 * self.every[1]
        if wall or self.signals.signum is not None:
            self.engine.request_checkpoint()
            self.asked = True

    def _take(self, engine: Any) -> None:
        self.asked = False
        self.last_wall = time.monotonic()
        if self.path is not None:
            try:
                self.save(engine)
            except OSError as e:  # a full disk must not end the run: say so, go on
                sys.stderr.write(f"relaxsgd: warning: checkpoint not written to {self.path}: "
                                 f"{e.strerror or e}; the run goes on (the previous "
                                 "checkpoint, if any, is kept)\n")
                if self.signals.signum is not None:
                    raise KeyboardInterrupt from None  # stop as a plain interrupt
                return
        if self.signals.signum is not None:
            folder = os.path.dirname(self.path or "") or "."
            raise StoppedAtCheckpoint(
                f"a checkpoint at local step {engine.procs[0].w.step} of worker 0 (virtual "
                f"time {engine.now:.3f}s) is saved: continue with 'relaxsgd resume "
                f"{folder}'", self.signals.signum)

    def save(self, engine: Any) -> None:
        from ..checkpoint import bank_state, worker_state

        workers = [p.w for p in engine.procs]
        ckpt.save(self.path, {
            "runtime": "sim", "config": self.resolved,
            "position": max(p.last_pos for p in engine.procs),
            "virtual_time": engine.now, "bank": bank_state(engine.bank),
            "workers": [worker_state(w) for w in workers],
            "engine": engine.state_dict(), "run": self.state()})
        self.saved += 1

    @staticmethod
    def restore(ck: dict[str, Any], engine: Any) -> None:
        """Put a checkpoint's bank, workers and engine state into a fresh run."""
        from ..checkpoint import load_bank_state, load_worker_state

        load_bank_state(engine.bank, ck["bank"])
        if len(ck["workers"]) != engine.n:
            raise ValueError(f"the checkpoint has {len(ck['workers'])} workers")
        for p, s in zip(engine.procs, ck["workers"], strict=True):
            load_worker_state(p.w, s, done_handle)
        engine.load_state_dict(ck["engine"])
