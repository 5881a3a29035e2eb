"""Elastic execution of a dist job (issue 20): quorum collectives, leaves, members.

A job is *elastic* when its workers may change while it runs: ``RELAXSGD_ELASTIC=1`` in
the workers' environment (``relaxsgd.distributed.launch --restarts K`` with K > 0 and
``relaxsgd join`` set it), or ``elastic.max_workers`` above ``workers``. Such a job has no
gloo process group at all (it would break at the first death, and rebuilding one per
membership needs every member in a barrier): its collectives are the quorum rounds of
:mod:`.quorum` on the job's authenticated transport, and a member change costs the
others nothing but the round it happens in.

What each kind of algorithm (``Algorithm.membership``) gets here:

- ``"quorum"``: every AllReduce/AllGather of the main program (and of its spawns) is a
  quorum round, and so is every ServerRound (led by rank 0, the server's host:
  :mod:`.quorum_server`); a departure drops the worker from the round under way and from
  the next ones, and ``Algorithm.on_leave`` runs on every survivor (under the worker lock).
- ``"gossip"``: ``Members()`` is the live set the transport knows; exchanges with a lost
  partner raise ``PeerUnavailable`` as before; ``on_leave`` runs as above.
- ``"fixed"``: the first departure ends the worker with one line
  (:func:`relaxsgd.membership.fixed_failure`), as a non-elastic job does.

A job that is not elastic is untouched: gloo collectives exactly as before.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ..membership import NotElastic, fixed_failure
from .handover import Donor, Joiner
from .membership import CLEAN_LEAVE
from .options import flag
from .quorum import QuorumCollectives
from .quorum_server import BACK, ServerQuorum, from_wire, wire_send
from .scripted import scripted_churn
from .wire import WireError

SPAWN_ROUNDS = 64  # quorum rounds one spawn may issue (the executor's limit)


def is_elastic(cfg: Any) -> bool:
    """Whether ``cfg``'s dist job runs elastic (see the module docstring)."""
    e = getattr(cfg, "elastic", None)
    most = e.max_workers if e is not None and e.max_workers is not None else cfg.workers
    traced = e is not None and e.churn.trace is not None  # a scripted trace: .scripted
    return flag("RELAXSGD_ELASTIC") or most > cfg.workers or traced


def incarnation() -> int:
    """This process's incarnation (``RELAXSGD_INCARNATION``: 0 at the job's start, one
    more per restart by the launcher)."""
    text = os.environ.get("RELAXSGD_INCARNATION", "0").strip() or "0"
    return int(text) if text.isdigit() else 0


def live_of(tr: Any) -> frozenset[int]:
    """The live ids ``tr`` knows, itself included (the transport's ``live()`` when it
    has one; else every id it has not marked lost)."""
    live = getattr(tr, "live", None)
    if callable(live):
        return frozenset(live()) | {tr.rank}
    return frozenset(r for r in range(tr.n) if r not in tr.dead)


class ElasticWorker:
    """The elastic side of one worker of a job (``runtime._Job``): quorum collectives
    on its executor and what happens on a member's departure or arrival."""

    def __init__(self, job: Any) -> None:
        self.job, self.ex, self.tr = job, job.ex, job.tr
        self.algo = job.prep.algo
        e = job.cfg.elastic
        self.n_max = e.max_workers if e.max_workers is not None else job.n
        self.gone: set[int] = set()
        self.seen: set[int] = set(range(job.n)) | {job.rank}  # ids that were ever live
        self.events: list[dict[str, Any]] = []  # result.json's "membership" (rank 0's view)
        self.live_over_time: list[list[float]] = [[0.0, float(job.n)]]
        self.ex.donor = Donor(job)
        self.joiner: Joiner | None = None
        self.ex.quorum = QuorumCollectives(
            job.rank, self.n_max, self._send, self.ex.live, range(job.n),
            e.min_quorum, e.quorum_wait_s, job.opts.timeout_s)
        # the spawns' rounds: their own numbers, negative on the wire (-1 - k)
        self.ex.quorum_spawns = QuorumCollectives(
            job.rank, self.n_max, self._send_spawn, self.ex.live,
            range(job.n), e.min_quorum, e.quorum_wait_s, job.opts.timeout_s,
            stride=SPAWN_ROUNDS)
        # the parameter server's rounds (rank 0 leads them; other kinds on the wire)
        self.ex.quorum_server = ServerQuorum(
            self.ex.server_host, self.ex.counts, job.rank, self.n_max,
            wire_send(self._send), self.ex.live, range(job.n), e.min_quorum,
            e.quorum_wait_s, job.opts.timeout_s)
        self.tr.on_dead.append(lambda r, why: self.left(r, why))
        on_member = getattr(self.tr, "on_member", None)
        if callable(on_member):
            on_member(self._member)
        self.script = scripted_churn(job, self)  # None without a trace

    def _send(self, peer: int, msg: tuple) -> None:
        self.tr.send(peer, msg)

    def _send_spawn(self, peer: int, msg: tuple) -> None:
        self.tr.send(peer, (msg[0], -1 - msg[1], *msg[2:]))

    def _quorums(self) -> list[QuorumCollectives]:
        return [q for q in (self.ex.quorum, self.ex.quorum_spawns, self.ex.quorum_server)
                if q is not None]

    def _member(self, kind: str, worker: int, info: str) -> None:
        if kind == "leave":
            self.left(worker, info)
        elif kind == "join":
            self.joined(worker)

    def left(self, worker: int, why: str) -> None:
        """``worker`` left: drop it from the rounds, tell the algorithm (once per leave)."""
        ex = self.ex
        if worker in self.job.done_from or why == CLEAN_LEAVE:
            return  # it finished and closed: no departure (nor in the simulator's record)
        with ex.lock:
            if worker in self.gone or worker == self.job.rank or \
                    worker in self.job.done_from:  # (a finished worker closing: no leave)
                return
            self.gone.add(worker)
            self._event(worker, "leave", why)
        for q in self._quorums():
            q.member_left(worker)
        if getattr(self.algo, "membership", "fixed") == "fixed":
            if ex.abort is None:
                ex.abort = NotElastic(fixed_failure(self.algo.name, worker, why))
            return
        with ex.lock:
            self.algo.on_leave(ex.w, worker)

    def joined(self, worker: int) -> None:
        """``worker`` (re)joined: the rounds may wait for it again once it contributes
        (.quorum), and a finished worker tells it so (it waits for everyone's "done")."""
        with self.ex.lock:
            self.gone.discard(worker)
            if worker in self.seen:
                self._event(worker, "rejoin", "restarted (live recovery)")
            else:  # a new id (relaxsgd join): it trains on its own shard from now on
                self.seen.add(worker)
                self._event(worker, "join", "joined (live recovery)")
        self.job.done_from.discard(worker)  # (an older incarnation's "done")
        for q in self._quorums():
            q.member_joined(worker)
        if self.ex.finished:
            self.tr.send(worker, ("done",))

    def _event(self, worker: int, event: str, cause: str) -> None:
        """Record a membership change (the worker lock held)."""
        t = float(self.ex.now())
        self.events.append({"time": t, "worker": worker, "event": event,
                            "cause": str(cause)[:300]})
        self.live_over_time.append([t, float(len(self.ex.live()))])

    def record(self) -> dict[str, Any]:
        """result.json's ``membership`` (ELASTIC.md item 8), as this worker saw it."""
        e = self.job.cfg.elastic
        return {"max_workers": self.n_max, "min_quorum": e.min_quorum,
                "events": list(self.events), "live_over_time": list(self.live_over_time)}

    @property
    def rejoining(self) -> bool:
        """Whether this process is a restarted worker (or a joiner): incarnation > 0."""
        if os.environ.get("RELAXSGD_JOIN") == "1":
            return True
        inc = getattr(self.tr, "incarnation", None)
        if callable(inc):
            return int(inc(self.job.rank)) > 0
        return incarnation() > 0

    def rejoin(self) -> int:
        """Take the job's state from a live donor (.handover), adopt it; the donor."""
        job = self.job
        self.joiner = Joiner(job)
        nbrs = None  # (as the simulator: a new id beyond workers takes the lowest live id)
        if getattr(self.algo, "membership", "") == "gossip" and hasattr(
                self.algo, "neighbors") and job.rank < self.algo.info.n:
            nbrs = list(self.algo.neighbors(job.rank))
        donor = self.joiner.receive(lambda: live_of(self.tr), nbrs, job.opts.timeout_s)
        self.resumed()
        with self.ex.lock:
            self.algo.adopt(self.ex.w, donor)
        if job.rank != 0:  # rank 0 records this worker's snapshots again from here
            self.tr.send(0, ("hjoin", int(job.snap.next)))
        how = "joined" if os.environ.get("RELAXSGD_JOIN") == "1" else "rejoined"
        sys.stderr.write(f"relaxsgd: worker {job.rank} {how} at {self.ex.now():.2f} s "
                         f"of the run, with worker {donor}'s state at its step "
                         f"{self.ex.w.step}\n")
        sys.stderr.flush()
        return donor

    def resumed(self) -> None:
        """The executor's round counters were set (a handover, a checkpoint): the quorum
        rounds go on from them (messages of rounds far from a worker's own are ignored)."""
        for q, at in ((self.ex.quorum, self.ex.coll_seq),
                      (self.ex.quorum_spawns, self.ex.spawns * SPAWN_ROUNDS),
                      (self.ex.quorum_server, self.ex.server_seq)):
            if q is not None:
                with q.cv:
                    q.current = at

    def on_message(self, src: int, msg: tuple) -> bool:
        kind = msg[0]
        if kind == "hask":
            self.ex.donor.ask(src, msg[1])
        elif kind == "hand":
            if self.joiner is not None:
                self.joiner.on_hand(src, msg[1], msg[2], msg[3])
        elif kind in ("sleave", "sback"):
            if self.script is None:
                raise WireError(f"worker {src} sent {kind!r}, but this job has no trace")
            self.script.on_message(src, kind, msg[1])
        elif kind == "hjoin":
            if self.job.evaluator is not None:
                self.job.evaluator.revive(src, msg[1])
        elif kind in BACK:  # a server round's (.quorum_server)
            q = self.ex.quorum_server
            return q is not None and q.on_message(src, from_wire(msg))
        elif kind in ("qpart", "qres", "qneed") and msg[1] < 0:  # a spawn's round
            q = self.ex.quorum_spawns
            return q is not None and q.on_message(src, (kind, -1 - msg[1], *msg[2:]))
        else:
            q = self.ex.quorum
            return q is not None and q.on_message(src, msg)
        return True
