"""SwarmSGD's sequential schedule under a churn trace known in advance (issue 20).

The sequential schedule is one stream of random edges that every worker regenerates from
the seed (:func:`.swarm_state.sequential_plans`), so it cannot follow churn that happens
at random: a drawn edge to a departed worker would never happen. A trace keyed by step
(``elastic.churn.trace`` with columns ``worker,event,step``), though, is known to every
worker before the run, and its events happen at safe points whose position in the stream
each worker can compute: so :func:`traced_plans` draws interaction t's edge uniformly among
the edges of G whose both ends are live at t, identically in both runtimes:

- a ``leave`` of i at step s happens at i's first safe point (before one of its
  interactions) with ``w.step >= s``: from the first t where i's local steps reach s, i is
  out of the stream (its program then reaches that safe point and the runtime takes it
  away there);
- a ``rejoin`` of j at step s happens at its donor's first safe point with ``w.step >= s``
  (the donor: :func:`relaxsgd.membership.donor_for`, j's lowest-id live neighbour), i.e.
  before the first interaction t of the donor where that holds: j copies the donor's state
  there (its local steps are the donor's) and is drawn again from t + 1 on.

:meth:`adopt` points the rejoiner's ``w.state["ti"]`` (copied from the donor, an index
into the DONOR's plan) at its own first interaction after t. Rows of other kinds (time,
``join``) and random churn (``mtbf_s``, ``joins``) keep the schedule ``"fixed"``.
Limits, as in the simulator: a rejoin whose donor has no safe point left (the stream ended)
never happens; the donor is chosen from the live set the stream gives, which is the one
the runtimes see when the rejoin's step comes well after the leaves before it.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

import numpy as np

from .. import salts
from ..membership import donor_for
from .base import Program, Recv, Send
from .swarm_state import Plan


def trace_problem(extra: dict[str, Any]) -> str | None:
    """Why the sequential schedule cannot play this run's churn (None: it can, or there is
    none); ``extra`` is ``RunInfo.extra`` (``trace``, ``random_churn``: run.prepare)."""
    events = extra.get("trace")
    base = ("the sequential schedule is one stream of edges fixed by the seed; it plays "
            "only a churn trace keyed by step (elastic.churn.trace with worker,event,step "
            "and leave/rejoin rows), known in advance")
    if not events or extra.get("random_churn"):
        return base
    if any(e.step is None or e.event == "join" for e in events):
        return base + ", not time-keyed or join rows"
    return None


def traced_plans(edges: list[tuple[int, int]], n: int, total: int, seed: int, H: int,
                 geometric: bool, events: list[Any],
                 neighbors: Callable[[int], list[int]]) -> list[Plan]:
    """Each worker's plan ``(t, partner, local steps, initiator)`` of the stream under the
    step-keyed ``events`` (see the module docstring); it stops at the first t where every
    live worker has done its ``total``, or when no edge has both ends live."""
    rng = np.random.default_rng([seed, salts.SWARM_PLAN])
    plans: list[Plan] = [[] for _ in range(n)]
    done = [0] * n
    leaves: dict[int, list[int]] = {}
    for e in events:
        if e.event == "leave":
            leaves.setdefault(e.worker, []).append(int(e.step))
    rejoins = [(e.worker, int(e.step)) for e in events if e.event == "rejoin"]
    live, t = set(range(n)), 0
    while True:
        for a in sorted(live):  # a leave due at a's next safe point: out from here
            if leaves.get(a) and done[a] >= leaves[a][0]:
                leaves[a].pop(0)
                live.discard(a)
        ends = [(i, j) for i, j in edges if i in live and j in live]
        if not ends or all(done[a] >= total for a in live):
            return plans
        i, j = ends[int(rng.integers(len(ends)))]
        if rng.random() < 0.5:
            i, j = j, i
        hs = [int(h) for h in rng.geometric(1.0 / H, size=2)] if geometric else [H, H]
        for a in (i, j):  # a's safe point before t: the rejoins it owes as a donor
            while rejoins and rejoins[0][0] not in live and done[a] >= rejoins[0][1] and \
                    donor_for(live, rejoins[0][0], neighbors(rejoins[0][0])) == a:
                back = rejoins.pop(0)[0]
                live.add(back)
                done[back] = done[a]
        for a, b, h, init in ((i, j, hs[0], True), (j, i, hs[1], False)):
            h = min(h, total - done[a])
            done[a] += h
            plans[a].append((t, b, h, init))
        t += 1


def adopt_sequential(plan_of: Callable[[int], Plan], w: Any, donor: int) -> None:
    """The rejoiner's place in its own plan: its first interaction at or after the one
    before which its donor handed over (``w.state["ti"]`` is the donor's index)."""
    theirs = plan_of(donor)
    ti = int(w.state["ti"])
    at = theirs[ti][0] if ti < len(theirs) else 1 + max((e[0] for e in theirs), default=-1)
    w.state["ti"] = bisect.bisect_left([e[0] for e in plan_of(w.rank)], at)


def pair(algo: Any, w: Any, j: int, t: int, init: bool) -> Program:
    """Interaction t of ``algo`` (a SwarmSGD) with j: copies both ways (Send/Recv tagged
    t), then average (both runtimes; the schedule's plans say who and when)."""
    pull = algo.cfg.update == "pull"
    sends, receives = not (pull and init), not (pull and not init)
    c = algo._copy(w)
    q_own, q_other, ok, stale = c, c, True, 0
    if sends:
        msg, q_own, nb = algo.codec.encode(w, j, c, w.rng)
        msg["stale"] = algo._stale(w)
        yield Send(j, msg, nb, tag=("x", t))
    if receives:
        msg = yield Recv(j, tag=("x", t))
        q_other, ok = algo.codec.decode(w, j, msg, c)
        stale = msg["stale"]
    if algo.codec.quantized:  # tell each other whether decoding worked; resend if not
        if receives:
            yield Send(j, ok, 1, tag=("ok", t))
        if sends and not (yield Recv(j, tag=("ok", t))):
            full, _, nb = algo.codec.full(w, j, q_own)
            w.count("fallback_bytes", nb)
            yield Send(j, full, nb, tag=("f", t))
        if receives and not ok:
            w.count("decode_failures")
            full = yield Recv(j, tag=("f", t))
            q_other, _ = algo.codec.decode(w, j, full, c)
    if receives:
        w.params.add_(algo._delta(q_own, q_other, c))
        algo._publish(w)
    algo._interacted(w, stale if receives else None)
