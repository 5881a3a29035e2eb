"""Churn in the simulator: workers leave, rejoin and join on the virtual clock (issue 20).

:class:`ChurnNode` is a mixin of :class:`~.engine.Engine`, active only when
:meth:`ChurnNode.enable_churn` was called (a run with an ``elastic.churn`` section); a run
without churn never enters this code, so its results are those of before, bit for bit.
The rules are :mod:`relaxsgd.membership`'s and docs/distributed.md's "Membership":

- **Leave** (at a drawn or traced virtual time, or at the worker's first safe point at or
  past a traced step): the worker stops at once, wherever it is; its coroutines are
  abandoned (each carries the worker's incarnation; events of an older one are ignored),
  messages to it are dropped, an :class:`Exchange` to it (or whose answer it owed) raises
  :class:`PeerUnavailable` in the requester, and it is dropped from every open round.
  Every live worker's ``Algorithm.on_leave`` runs. A ``"fixed"`` algorithm fails the run.
- **Rejoin / join**: a request waits for the donor's next ``Checkpoint()`` (the donor:
  :func:`relaxsgd.membership.donor_for` among the live workers still training, checked at
  each of their safe points, so the choice is deterministic). There the donor's row
  (parameters, optimizer state, step count), its ``w.state`` (through the checkpoint
  encoding) and its collective/server round counters are copied into the newcomer (and
  the messages sent to it while it was away, when its rejoin is keyed by step); the
  transfer travels over the donor's link (its bytes counted as the donor's); on arrival the
  newcomer is live, ``Algorithm.adopt`` runs and its program starts as on resume.
- **Quorum rounds** (every AllReduce/AllGather/ServerRound under churn): round k expects
  the workers live when its first member issued it; it completes when every expected
  worker still live has issued it, with those as participants (mean weighted
  1/participants; the backend's cost for that many). A worker admitted after the round
  started is a listener: it gets the round's result and contributes nothing. Below
  ``min_quorum`` participants the round waits ``quorum_wait_s`` (newcomers then count as
  participants), then the run fails with a line naming who is missing. A worker that is
  back (its rejoin or join requested) counts toward that quorum at once, as torchft's
  healing replicas do: the round completes with the participants' mean, and the newcomer
  receives its state at the donor's next safe point, right after the round.
"""

from __future__ import annotations

from typing import Any

from ..algorithms.base import AllReduce, Handle, PeerUnavailable, ServerRound
from ..membership import (
    ChurnDraws,
    Membership,
    NotElastic,
    QuorumLost,
    donor_for,
    fixed_failure,
    quorum_failure,
    quorum_mean,
)
from ..state_tree import decode, encode, pending_handles
from .barrier import done_handle
from .collectives import allgather_cost, allreduce_cost


class Failed:
    """A handle's value that the engine throws into the waiting program."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class ChurnNode:
    """Mixin: membership, churn events, handover and quorum rounds (module docstring)."""

    procs: list[Any]
    now: float
    algo: Any
    net: Any
    bank: Any
    at: Any
    _serve_uploads: Any  # (.server.ServerNode)
    _resolve: Any
    _count: Any
    _advance: Any

    def _init_churn(self) -> None:
        self.members: Membership | None = None  # None: no churn (the run of before)
        self._admissions: list[dict[str, Any]] = []
        self._step_events: dict[int, list[Any]] = {}  # worker -> its pending step events
        self._qrounds: dict[tuple[str, int], dict[str, Any]] = {}
        self._qdone: dict[tuple[str, int], tuple[float, Any]] = {}
        # gone workers whose step-keyed rejoin is queued: messages sent to them are kept
        # for their next incarnation (a plan known in advance, e.g. SwarmSGD's sequential
        # stream, may address a rejoiner before it is back; the dist runtime's in-process
        # leaver keeps them too: distributed/scripted.py)
        self.keep_mail: set[int] = set()

    def enable_churn(self, members: Membership, draws: ChurnDraws,
                     downtime_s: float | None, min_quorum: int, quorum_wait_s: float,
                     timed: list[Any], stepped: list[Any], joins: list[float]) -> None:
        """Turn churn on: ``timed`` trace events (with ``time``), ``stepped`` ones (with
        ``step``), the times of ``joins``, and the rate draws; procs with ids never live
        start absent."""
        self.members, self.draws, self.downtime_s = members, draws, downtime_s
        self.min_quorum, self.quorum_wait_s = min_quorum, quorum_wait_s
        for p in self.procs:
            p.w.ordered_server_rounds = True  # quorum server rounds: one after another
            p.gone = p.w.rank not in members.live
            if not p.gone:
                self._schedule_failure(p.w.rank, 0.0)
        for e in timed:
            self.at(e.time, self._timed_event, e.worker, e.event, "trace")
        for e in stepped:
            self._step_events.setdefault(e.worker if e.event == "leave" else -1, []).append(e)
        for t in joins:
            self.at(t, self._timed_event, None, "join", "churn")

    # -- events --------------------------------------------------------------------
    def _schedule_failure(self, rank: int, up_since: float) -> None:
        t = self.draws.next_failure(rank, up_since)
        if t is not None:
            self.at(t, self._timed_event, rank, "leave", "churn", self.procs[rank].inc)

    def _timed_event(self, rank: int | None, event: str, cause: str, inc: int = -1) -> None:
        if event == "leave":
            p = self.procs[rank]
            if p.gone or p.done or (inc >= 0 and inc != p.inc):
                return  # a draw for an incarnation that is over
            self._leave(p, cause)
        else:
            self._admissions.append({"worker": rank, "cause": cause, "step": 0})
            for key in [k for k, r in self._qrounds.items() if r["waiting"]]:
                self._try_complete(key)  # a worker back counts toward a waiting quorum

    def _leave(self, p: Any, cause: str) -> None:
        assert self.members is not None
        rank = p.w.rank
        if self.algo.membership == "fixed":
            why = getattr(self.algo, "fixed_reason", "it has no elastic support")
            raise NotElastic(fixed_failure(self.algo.name, rank, why))
        p.inc += 1
        p.gone, p.busy_until, p.parked, p.live_spawns = True, None, None, 0
        p.deferred = []
        for h in p.owed:
            self._resolve(h, Failed(PeerUnavailable(rank, "it left")))
        p.owed = []
        self.members.leave(self.now, rank, cause)
        if any(e.worker == rank for e in self._step_events.get(-1, ())):
            self.keep_mail.add(rank)
        for q in self.procs:
            if not q.gone:
                self.algo.on_leave(q.w, rank)
        for key in list(self._qrounds):
            r = self._qrounds[key]
            r["expected"].discard(rank)
            r["members"].pop(rank, None)
            r["listeners"].pop(rank, None)
            self._try_complete(key)
        if cause == "churn" and self.downtime_s is not None:
            self.at(self.now + self.downtime_s, self._timed_event, rank, "rejoin", "churn")

    def churn_point(self, coro: Any) -> bool:
        """At a worker's safe point: its traced leave (True: it is gone), and the
        handovers it owes as a donor."""
        p = coro.proc
        mine = self._step_events.get(p.w.rank)
        if mine and p.w.step >= mine[0].step:
            mine.pop(0)
            self._leave(p, "trace")
            return True
        queued = self._step_events.get(-1)
        while queued and self._donor_of(queued[0].worker) == p.w.rank and \
                p.w.step >= queued[0].step:
            e = queued.pop(0)
            self._admissions.append({"worker": e.worker, "cause": "trace", "step": e.step})
        for a in list(self._admissions):
            if a["worker"] is None:  # a new id: the lowest never used nor promised
                taken = {x["worker"] for x in self._admissions} | \
                    {q.w.rank for q in self.procs if q.arriving}
                a["worker"] = next((i for i in range(len(self.procs)) if i not in taken
                                    and self.members and i not in self.members.used), None)
                if a["worker"] is None:
                    self._admissions.remove(a)  # every id is taken: refused
                    continue
            if self._donor_of(a["worker"]) == p.w.rank:
                self._admissions.remove(a)
                waiting = pending_handles(p.w.state)
                if waiting:  # as at a checkpoint: first what it has in flight
                    self._hold(coro, waiting, a)
                    return True
                self._hand_over(p, self.procs[a["worker"]], a["cause"])
        return False

    def _hold(self, coro: Any, waiting: list[Handle], a: dict[str, Any]) -> None:
        """Hold the donor at its safe point until the handles in its ``w.state`` are done,
        then hand over and let it go on (the wait is its stall)."""
        p, left = coro.proc, [len(waiting)]
        coro.stall_from = self.now

        def one_done(_: Any) -> None:
            left[0] -= 1
            if left[0] or coro.inc != p.inc:
                if coro.inc != p.inc and not left[0]:
                    self._admissions.append(a)  # the donor left meanwhile: another one
                return
            target = self.procs[a["worker"]]
            if target.gone and not target.arriving:
                self._hand_over(p, target, a["cause"])
            self.at(self.now, self._advance, coro, None)

        for h in waiting:
            h.waiters.append(one_done)

    def _donor_of(self, joiner: int) -> int | None:
        live = [q.w.rank for q in self.procs if not q.gone and not q.done
                and not getattr(q, "arriving", False) and q.w.rank != joiner]
        if not live or not self.procs[joiner].gone:
            return None
        nbrs = None
        if self.algo.membership == "gossip" and hasattr(self.algo, "neighbors"):
            nbrs = self.algo.neighbors(joiner) if joiner < self.algo.info.n else None
        return donor_for(live, joiner, nbrs)

    def _hand_over(self, donor: Any, p: Any, cause: str) -> None:
        """Copy the donor's state into ``p`` now; ``p`` starts when it has arrived."""
        b, d, j = self.bank, donor.w.row, p.w.row
        b.X[j].copy_(b.X[d])
        b.M[j].copy_(b.M[d])
        b.V[j].copy_(b.V[d])
        b.steps[j] = b.steps[d]
        for name, buf in b.buffers_of(d).items():
            b.buffers_of(j)[name].copy_(buf)
        p.w.state = decode(encode(donor.w.state, "the donor's state"), done_handle)
        p.coll_seq, p.server_seq, p.last_pos = donor.coll_seq, donor.server_seq, \
            donor.last_pos
        if p.w.rank not in self.keep_mail:
            p.mail.load_inbox({})
        p.inc += 1
        p.arriving = True
        nbytes = 2 * b.X[d].numel() * b.X.element_size()  # parameters and momentum
        left, arrive, tries = self.net.p2p(donor.w.rank, nbytes, self.now, p.w.rank)
        self._count(donor, nbytes * tries, tries)
        self.at(arrive, self._arrive, p, donor.w.rank, cause)

    def _arrive(self, p: Any, donor: int, cause: str) -> None:
        assert self.members is not None
        p.arriving, p.gone, p.done = False, False, False
        self.keep_mail.discard(p.w.rank)
        self.members.admit(self.now, p.w.rank, cause)
        self.algo.adopt(p.w, donor)
        for r in self._qrounds.values():  # a round waiting for its quorum takes it in
            if r["waiting"]:
                r["expected"].add(p.w.rank)
        self._schedule_failure(p.w.rank, self.now)
        self._start(p)

    def _start(self, p: Any) -> None:  # the engine's: run program(w) from w.state
        raise NotImplementedError

    # -- quorum rounds -------------------------------------------------------------
    def quorum_join(self, p: Any, eff: Any, kind: str, seq: int, t: float) -> Handle:
        """Worker ``p`` issues round ``seq`` of ``kind`` ("coll" or "server") at ``t``."""
        key = (kind, seq)
        h = Handle(f"{kind} round #{seq}")
        if key in self._qdone:  # a listener late for a finished round
            end, value = self._qdone[key]
            self.at(max(end, self.now), self._resolve, h, _fresh(value))
            return h
        r = self._qrounds.get(key)
        if r is None:
            live = {q.w.rank for q in self.procs if not q.gone and not q.arriving}
            r = self._qrounds[key] = {"expected": live, "members": {}, "listeners": {},
                                      "t": 0.0, "waiting": False}
        if p.w.rank in r["expected"]:
            r["members"][p.w.rank] = (eff, h)
            r["t"] = max(r["t"], t)
        else:
            r["listeners"][p.w.rank] = h
        self._try_complete(key)
        return h

    def _try_complete(self, key: tuple[str, int]) -> None:
        r = self._qrounds[key]
        if not r["expected"] <= set(r["members"]):
            return
        if len(r["members"]) + self._back() < self.min_quorum:
            if not r["waiting"]:
                r["waiting"] = True
                self.at(self.now + self.quorum_wait_s, self._quorum_timeout, key, self.now)
            return
        del self._qrounds[key]
        end, value = (self._serve_quorum if key[0] == "server" else self._reduce_quorum)(r)
        self._qdone[key] = (end, value)
        # keep the results a worker may still ask for as a late listener (a newcomer on
        # its way counts: it starts from its donor's round counter)
        low = min([q.coll_seq if key[0] == "coll" else q.server_seq
                   for q in self.procs if not q.gone or q.arriving] or [0])
        for k in [k for k in self._qdone if k[0] == key[0] and k[1] < low - 1]:
            del self._qdone[k]

    def _back(self) -> int:
        """Workers that are back and wait for their state (they count toward a quorum)."""
        return sum(1 for a in self._admissions
                   if a["worker"] is None or self.procs[a["worker"]].gone)

    def _quorum_timeout(self, key: tuple[str, int], since: float) -> None:
        r = self._qrounds.get(key)
        if r is None or len(r["members"]) + self._back() >= self.min_quorum:
            return
        missing = [q.w.rank for q in self.procs if q.w.rank not in r["members"]
                   and q.w.rank in (self.members.used if self.members else ())]
        raise QuorumLost(quorum_failure(f"{'server' if key[0] == 'server' else 'collective'}"
                                        f" round #{key[1]} at t={since:g}s",
                                        r["members"], missing, self.min_quorum,
                                        self.quorum_wait_s))

    def _reduce_quorum(self, r: dict[str, Any]) -> tuple[float, Any]:
        part = sorted(r["members"])
        effs = [r["members"][k][0] for k in part]
        n, e0 = len(part), effs[0]
        if isinstance(e0, AllReduce):
            sizes = [e.nbytes if e.nbytes is not None else _nbytes(e.tensors) for e in effs]
            lat, tx = allreduce_cost(self.net.cfg, n, max(sizes))
            if isinstance(e0.tensors, (list, tuple)):
                value: Any = [quorum_mean([e.tensors[k] for e in effs])
                              for k in range(len(e0.tensors))]
            else:
                value = quorum_mean([e.tensors for e in effs])
            for k, s in zip(part, sizes, strict=True):
                self._count(self.procs[k], 2 * (n - 1) / n * s, 2 * (n - 1))
        else:
            sizes = [e.nbytes for e in effs]
            lat, tx = allgather_cost(self.net.cfg, n, sizes)
            for k in part:
                self._count(self.procs[k], (n - 1) / n * sum(sizes), n - 1)
            value = [None] * len(self.procs)
            for k, e in zip(part, effs, strict=True):
                value[k] = e.payload
        end = self.net.collective(r["t"], lat, tx)
        for h in [r["members"][k][1] for k in part] + list(r["listeners"].values()):
            self.at(end, self._resolve, h, _fresh(value))
        return end, value

    def _serve_quorum(self, r: dict[str, Any]) -> tuple[float, Any]:
        """Serve the participants' uploads as a full round is served (.server); the
        members' replies, then the listeners' (rejoiners told the round's result)."""
        part = sorted(r["members"])
        effs: list[ServerRound] = [r["members"][k][0] for k in part]
        nbytes = effs[0].down_nbytes
        to = [(k, r["members"][k][1], nbytes) for k in part] + [
            (k, h, nbytes) for k, h in r["listeners"].items()]
        return self._serve_uploads(effs, r["t"], to)

    def all_gone(self) -> None:
        """Every worker left and none finished: the run cannot go on (one line)."""
        last = self.members.events[-1]["time"] if self.members and self.members.events else 0
        raise QuorumLost(f"every worker left (the last at t={last:g}s) before any finished; "
                         "a worker comes back only from a live one's state: lower "
                         "elastic.churn's failure rate or its downtime")

    def churn_record(self) -> dict[str, Any] | None:
        """``result.json["membership"]``, or None without churn."""
        return None if self.members is None else self.members.record()


def _fresh(value: Any) -> Any:
    """A copy of a round's result for one receiver (results are owned by the receiver)."""
    import copy

    return copy.deepcopy(value)


def _nbytes(t: Any) -> int:
    from ..algorithms.base import tensor_nbytes

    return tensor_nbytes(t)
