"""Membership: which workers are live, what happened to them, and the quorum rule (issue 20).

Pure and shared by both runtimes (the simulator's engine, :mod:`relaxsgd.sim.churn`, and
the distributed runtime). Terms, as docs/distributed.md ("Membership") explains them:

- A worker has an id in ``0 .. max_workers-1``. It is *live* from the start (ids below
  ``workers``) or from its admission (a rejoin or a join, at its donor's safe point) until
  it *leaves* (killed, frozen past the peer timeout, or done with a clean leave).
- The *events* of a run, in order: ``{"time", "worker", "event", "cause"}`` with event
  ``leave``, ``rejoin`` or ``join``; and ``live_over_time``, ``[[time, n_live], ...]``
  after each change. Both go into ``result.json["membership"]`` (:meth:`Membership.record`).
- An algorithm's ``membership`` (:class:`relaxsgd.algorithms.base.Algorithm`) is
  ``gossip`` (partners among the live workers, no rounds), ``quorum`` (synchronous rounds
  among the workers present), or ``fixed`` (no elastic support: a leave ends the run).
- A quorum round k is taken among its *participants*: the members when it started (the
  first worker issued it) that have not left by the time it completes; its mean weighs each
  participant 1/len(participants) (:func:`quorum_mean`). Below ``min_quorum`` members the
  round waits ``quorum_wait_s`` for (re)joins, then the run fails with
  :func:`quorum_failure`'s line naming who is missing.

The simulator's failures are drawn by :class:`ChurnDraws`: one stream per worker, seeded
from (seed, worker id, :data:`relaxsgd.salts.CHURN`), so the schedule of a worker's
failures depends on the seed and its id alone, not on what the others do.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import salts
from .errors import RelaxError

MEMBERSHIPS = ("gossip", "quorum", "fixed")


class QuorumLost(RelaxError, RuntimeError):
    """A synchronous round stayed below ``elastic.min_quorum`` for ``quorum_wait_s``."""

    exit_code = 5


class NotElastic(RelaxError, RuntimeError):
    """A worker left a run whose algorithm has ``membership = "fixed"``."""

    exit_code = 5


class Membership:
    """The live set of a run and its history (plain data; see the module docstring)."""

    def __init__(self, workers: int, max_workers: int, min_quorum: int = 1) -> None:
        self.max_workers, self.min_quorum = max_workers, min_quorum
        self.live: set[int] = set(range(workers))
        self.used: set[int] = set(range(workers))  # ids that were ever live
        self.events: list[dict[str, Any]] = []
        self.live_over_time: list[list[float]] = [[0.0, workers]]

    def members(self) -> tuple[int, ...]:
        """The sorted tuple of live ids (what the ``Members()`` effect returns)."""
        return tuple(sorted(self.live))

    def leave(self, time: float, worker: int, cause: str) -> None:
        if worker not in self.live:
            raise ValueError(f"worker {worker} leaves but is not live")
        self.live.discard(worker)
        self._log(time, worker, "leave", cause)

    def admit(self, time: float, worker: int, cause: str) -> str:
        """Make ``worker`` live again (a rejoin) or for the first time (a join); returns
        the event's name."""
        if worker in self.live or not 0 <= worker < self.max_workers:
            raise ValueError(f"worker {worker} cannot be admitted (live or out of range)")
        event = "rejoin" if worker in self.used else "join"
        self.live.add(worker)
        self.used.add(worker)
        self._log(time, worker, event, cause)
        return event

    def next_new_id(self) -> int | None:
        """The lowest id never used (a new joiner's), or None when all are taken."""
        for i in range(self.max_workers):
            if i not in self.used:
                return i
        return None

    def _log(self, time: float, worker: int, event: str, cause: str) -> None:
        self.events.append({"time": time, "worker": worker, "event": event, "cause": cause})
        if self.live_over_time[-1][0] == time:
            self.live_over_time[-1][1] = len(self.live)
        else:
            self.live_over_time.append([time, len(self.live)])

    def record(self) -> dict[str, Any]:
        """``result.json["membership"]`` (ELASTIC.md item 8)."""
        return {"max_workers": self.max_workers, "min_quorum": self.min_quorum,
                "events": [dict(e) for e in self.events],
                "live_over_time": [list(x) for x in self.live_over_time]}

    def state_dict(self) -> dict[str, Any]:
        return {"live": sorted(self.live), "used": sorted(self.used),
                "events": [dict(e) for e in self.events],
                "live_over_time": [list(x) for x in self.live_over_time]}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.live, self.used = set(s["live"]), set(s["used"])
        self.events = [dict(e) for e in s["events"]]
        self.live_over_time = [list(x) for x in s["live_over_time"]]


def donor_for(live: Iterable[int], joiner: int, neighbors: Sequence[int] | None = None) -> int:
    """Who hands its state to ``joiner``: its lowest-id live graph neighbour (gossip, when
    it has one), else the lowest live id (ELASTIC.md item 7)."""
    others = sorted(i for i in live if i != joiner)
    if not others:
        raise ValueError("no live worker to take the state from")
    if neighbors:
        near = [i for i in others if i in set(neighbors)]
        if near:
            return near[0]
    return others[0]


def quorum_mean(tensors: Sequence[Tensor]) -> Tensor:
    """The mean of the participants' tensors: each weighs 1/len(tensors)."""
    if not tensors:
        raise ValueError("a round with no participant has no mean")
    return torch.stack(list(tensors)).mean(0)


def quorum_failure(round_name: str, present: Iterable[int], missing: Iterable[int],
                   min_quorum: int, waited: float) -> str:
    """The one line of a round that stayed below the minimum."""
    have = sorted(present)
    gone = sorted(missing)
    return (f"{round_name} stayed below elastic.min_quorum={min_quorum} for {waited:g} s: "
            f"{len(have)} worker(s) present {have}, missing {gone}; lower "
            "elastic.min_quorum or raise elastic.quorum_wait_s")


def fixed_failure(algo: str, worker: int, why: str) -> str:
    """The one line of a leave in a run whose algorithm is not elastic."""
    return (f"worker {worker} left, and algorithm {algo!r} cannot go on without it "
            f"(membership 'fixed': {why}); use a gossip or quorum algorithm, or "
            "relaxsgd resume from the last checkpoint")


class ChurnDraws:
    """Deterministic failure times: worker ``i``'s k-th up-time is the k-th exponential
    draw (mean ``mtbf_s``) of its own stream ``Random((seed, i, salts.CHURN))``."""

    def __init__(self, seed: int, mtbf_s: float | None) -> None:
        self.seed, self.mtbf_s = seed, mtbf_s
        self._rngs: dict[int, random.Random] = {}

    def _rng(self, worker: int) -> random.Random:
        if worker not in self._rngs:
            self._rngs[worker] = random.Random(f"{self.seed}:{worker}:{salts.CHURN}")
        return self._rngs[worker]

    def next_failure(self, worker: int, up_since: float) -> float | None:
        """The time of ``worker``'s next failure after it came up at ``up_since``."""
        if self.mtbf_s is None:
            return None
        return up_since + self._rng(worker).expovariate(1.0 / self.mtbf_s)

    def state_dict(self) -> dict[str, Any]:
        return {str(k): list(r.getstate()[1]) + [r.getstate()[0]]
                for k, r in self._rngs.items()}
