"""Scripted churn: a step-keyed ``elastic.churn.trace`` run for real by the dist runtime.

In the simulator a trace row ``worker,event,step`` takes effect at a safe point
(:mod:`relaxsgd.sim.churn`): a ``leave`` at the leaver's first ``Checkpoint()`` with
``w.step >= step``; a ``rejoin`` at its DONOR's first safe point with ``w.step >= step``
(the donor: :func:`relaxsgd.membership.donor_for` among the live workers). A real restart
cannot do that: how long the process takes to come back decides which round it joins.
Here every worker reads the same trace and plays it at those same points, so that the
dist runtime ends with the simulator's models for the same trace (tests/test_dist_scripted):

- **leave**: at that safe point the leaver tells every live worker (``("sleave", id)``),
  drops its state (parameters, optimizer state, buffers, ``w.state`` zeroed or cleared)
  and waits IN ITS PROCESS; the others take it out of their live set
  (``Executor.away``: ``Members()`` and the quorum rounds no longer count it), run
  ``Algorithm.on_leave`` and go on. Its transport stays connected (nothing else is sent
  to it). A leave with no later rejoin ends the process (exit 0) once the others know.
- **rejoin**: the leaver asks its donor for the handover at once (``hask``, the live
  recovery of :mod:`.handover`, over the transport); the donor answers only at its
  first safe point with ``w.step >= step`` (waiting there for the ask if needed), then
  counts the rejoiner as a member of its quorum rounds from the next one (for a
  ``"quorum"`` algorithm the donor is the lowest live id: the rounds' leader, so the
  round after the handover waits for the rejoiner's contribution) and tells the others
  (``("sback", id)``). The rejoiner copies the state in, runs ``Algorithm.adopt`` and
  starts ``program(w)`` again from ``w.state``, as the simulator does.

Not scripted here (one line, exit 2): time-keyed rows (virtual seconds mean nothing on
real clocks), ``join`` rows (a new process: ``relaxsgd join``), and rows of worker 0
(it hosts the evaluation and the outputs). The donor must still be training when its
rejoiner is due (as in the simulator, where a finished worker hands nothing over).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import torch

from ..elastic_config import TraceEvent, read_trace
from ..errors import ConfigError
from ..membership import donor_for
from .handover import Donor, HandoverFailed, Joiner

SPAWN_ROUNDS = 64  # (.elastic's: the spawns' quorum rounds per block)


def trace_events(cfg: Any) -> list[TraceEvent] | None:
    """The step-keyed trace the dist runtime plays (None: no trace), or ConfigError."""
    if cfg.elastic.churn.trace is None:
        return None
    events = read_trace(cfg.elastic.churn.trace, cfg.workers, cfg.elastic.ids(cfg.workers))
    where = f"churn trace {cfg.elastic.churn.trace!r}"
    if any(e.step is None for e in events):
        raise ConfigError(f"{where} is keyed by time; the dist runtime plays only a trace "
                          "keyed by step (columns worker,event,step): virtual seconds mean "
                          "nothing on real clocks")
    for e in events:
        if e.event == "join":
            raise ConfigError(f"{where}: worker {e.worker} joins; the dist runtime plays "
                              "leave and rejoin rows only (a new worker: relaxsgd join)")
        if e.worker == 0:
            raise ConfigError(f"{where}: worker 0 {e.event}s; in the dist runtime worker 0 "
                              "hosts the evaluation and the outputs: script another worker")
    return events


def scripted_churn(job: Any, el: Any) -> ScriptedChurn | None:
    """The job's :class:`ScriptedChurn` when its config has a trace, else None."""
    events = trace_events(job.cfg)
    return None if events is None else ScriptedChurn(job, el, events)


class ScriptedDonor(Donor):
    """A donor that hands over to a traced rejoiner only when the trace says
    (:meth:`ScriptedChurn.safe_point`): its early ask (it asks at once) waits for that
    point."""

    def due(self) -> bool:
        """Only a real restart's ask (of a worker the trace did not take away) is served
        at any safe point, as in a job without a trace."""
        return bool(self._real())

    def serve(self, ctx: Any, only: int | None = None) -> None:
        for j in ([only] if only is not None else self._real()):
            super().serve(ctx, only=j)

    def _real(self) -> list[int]:
        with self.lock:
            return sorted(j for j in self.asks if j not in self.job.ex.away)

    def has(self, joiner: int) -> bool:
        with self.lock:
            return joiner in self.asks


class ScriptedChurn:
    """One worker's side of a scripted trace (see the module docstring)."""

    def __init__(self, job: Any, el: Any, events: list[TraceEvent]) -> None:
        self.job, self.el, self.ex = job, el, job.ex
        self.algo = job.prep.algo
        self.rank = job.rank
        self.leaves = [int(e.step) for e in events  # (step-keyed: checked above)
                       if e.event == "leave" and e.worker == job.rank]
        self.rejoins = [(e.worker, int(e.step)) for e in events if e.event == "rejoin"]
        self.lock = threading.Lock()
        self.donor = ScriptedDonor(job)
        job.ex.donor = self.donor
        job.ex.script = self

    # -- at this worker's safe points ---------------------------------------------------
    def safe_point(self, ctx: Any) -> bool:
        """Play what the trace says at this safe point; True: this worker left and came
        back (its program was started again: the caller does nothing more)."""
        w = self.ex.w
        if self.leaves and w.step >= self.leaves[0]:
            self.leaves.pop(0)
            self._leave_and_return()
            return True
        while True:
            with self.lock:
                head = self.rejoins[0] if self.rejoins else None
            if head is None or w.step < head[1] or head[0] not in self.ex.away:
                return False
            j = head[0]
            if self._donor_of(j) != self.rank:
                return False
            self._hand_over(j, ctx)

    def _donor_of(self, joiner: int) -> int:
        nbrs = None
        if getattr(self.algo, "membership", "") == "gossip" and hasattr(self.algo,
                                                                       "neighbors"):
            nbrs = list(self.algo.neighbors(joiner))
        return donor_for(self.ex.live() - {joiner}, joiner, nbrs)

    def _hand_over(self, j: int, ctx: Any) -> None:
        """Donor: wait for ``j``'s ask, hand over now, count it in from the next round."""
        end = time.monotonic() + self.job.opts.timeout_s
        while not self.donor.has(j):
            self.ex._check_abort()
            if time.monotonic() > end:
                raise HandoverFailed(f"worker {j} did not ask worker {self.rank} for its state "
                                   f"within {self.job.opts.timeout_s:g}s (RELAXSGD_TIMEOUT) "
                                   "at the rejoin its trace says")
            time.sleep(0.005)
        self.donor.serve(ctx, only=j)
        self._back(j)
        for r in sorted(self.ex.live() - {self.rank, j}):
            self.job.tr.send(r, ("sback", j))

    # -- the leaver's side ---------------------------------------------------------------
    def _leave_and_return(self) -> None:
        job, ex, w = self.job, self.ex, self.ex.w
        for r in sorted(ex.live() - {self.rank}):
            job.tr.send(r, ("sleave", self.rank))
        sys.stderr.write(f"relaxsgd: worker {self.rank} leaves at its step {w.step} "
                         "(elastic.churn.trace)\n")
        sys.stderr.flush()
        with ex.lock, torch.no_grad():  # what a dead process loses (the handover restores)
            for t in (job.bank.X[0], job.bank.M[0], job.bank.V[0],
                      *job.bank.buffers_of(0).values()):
                t.zero_()
            w.state.clear()
        with self.lock:
            mine = next((k for k, (j, _) in enumerate(self.rejoins) if j == self.rank), None)
        if mine is None:  # it never comes back: end this process (as a killed one does:
            time.sleep(0.2)  # its "sleave" on its way first; the others know it is gone)
            os._exit(0)
        donor = self._rejoin()
        with self.lock:
            self.rejoins.pop(mine)
        sys.stderr.write(f"relaxsgd: worker {self.rank} rejoined (elastic.churn.trace) "
                         f"with worker {donor}'s state at its step {w.step}\n")
        sys.stderr.flush()
        if ex.gen is not None:
            ex.gen.close()
        ex.gen = self.algo.program(w)  # started as on resume, from w.state

    def _rejoin(self) -> int:
        """Live recovery (.handover) from the donor the trace's point gives; the donor."""
        job, ex = self.job, self.ex
        self.el.joiner = joiner = Joiner(job)
        nbrs = None
        if getattr(self.algo, "membership", "") == "gossip" and hasattr(self.algo,
                                                                       "neighbors"):
            nbrs = list(self.algo.neighbors(self.rank))
        while True:  # (the traced step may come later than RELAXSGD_TIMEOUT after the leave)
            try:
                donor = joiner.receive(ex.live, nbrs, job.opts.timeout_s)
                break
            except HandoverFailed:
                if not ex.live() - {self.rank}:
                    raise  # nobody left to hand it over
        for q, at in ((ex.quorum, ex.coll_seq), (ex.quorum_spawns, ex.spawns * SPAWN_ROUNDS)):
            if q is not None:
                with q.cv:
                    q.current = at
        with ex.lock:
            self.algo.adopt(ex.w, donor)
        if self.rank != 0:  # rank 0 records this worker's snapshots again from here
            job.tr.send(0, ("hjoin", int(job.snap.next)))
        return donor

    # -- what the others say ---------------------------------------------------------------
    def on_message(self, src: int, kind: str, worker: int) -> None:
        """``("sleave", src)``: ``src`` left; ``("sback", j)``: ``j``'s donor handed over."""
        if kind == "sleave":
            if worker != src:
                return  # a worker speaks only for itself
            self.ex.away = self.ex.away | {src}  # (rebound: read by other threads)
            if self.job.evaluator is not None:
                self.job.evaluator.mark_dead(src, ordered=True)
            self.el.left(src, "elastic.churn.trace")
        elif worker != self.rank and worker in self.ex.away:
            with self.lock:  # only a rejoin the trace says is still to come
                due = any(x == worker for x, _ in self.rejoins)
            if due:
                self._back(worker)

    def _back(self, j: int) -> None:
        """``j`` is back: live and a member of the quorum rounds from the next one."""
        with self.lock:
            k = next((k for k, (x, _) in enumerate(self.rejoins) if x == j), None)
            if k is not None:
                self.rejoins.pop(k)
        self.ex.away = self.ex.away - {j}
        self.el.joined(j)
        for q in (self.ex.quorum, self.ex.quorum_spawns,
                  getattr(self.ex, "quorum_server", None)):
            if q is not None:  # (the server's rounds too: OLCO3 / EF-SGD with ps)
                q.member_joined(j, member=True)
