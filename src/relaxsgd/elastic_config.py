"""The ``elastic:`` section of a run config, and the churn trace file (issue 20).

Contract (/work/wt ELASTIC.md, items 1, 2): ``elastic.max_workers`` (None: ``workers``)
bounds the worker ids (``0 .. max_workers-1``; the data set is split into that many
shards and worker ``i`` always trains on shard ``i``); ``min_quorum`` and
``quorum_wait_s`` are the quorum rule of synchronous rounds
(:mod:`relaxsgd.membership`); ``churn`` is the simulator's failure model (in the
distributed runtime churn is real): per-worker exponential failures of mean ``mtbf_s``,
each followed by a rejoin ``downtime_s`` later (None: never back), ``joins`` new workers
``join_every_s`` apart (the first at ``join_every_s``), and a ``trace`` CSV of explicit
events. A config without an ``elastic:`` section is exactly the run of before.

A trace file: a header naming ``worker,event`` and either ``time`` (virtual seconds) or
``step`` (a leave: at the worker's first safe point at or past that local step; a rejoin
or join: at its donor's); ``event`` one of ``leave``, ``rejoin``, ``join``. Read by
:func:`read_trace` as untrusted input: one :class:`~relaxsgd.errors.ConfigError` line
for a file that is not one, naming the row and what would be right.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .checks import require_float, require_int
from .errors import ConfigError, shown
from .requires import Needs, check_needs

EVENTS = ("leave", "rejoin", "join")
MAX_TRACE_BYTES = 4 << 20  # 100k rows of ~30 characters
MAX_TRACE_ROWS = 100_000  # each a scheduled event


@dataclass(frozen=True)
class ChurnConfig:
    """The simulator's churn (see the module docstring); all off by default."""

    mtbf_s: float | None = None
    downtime_s: float | None = None
    joins: int = 0
    join_every_s: float = 60.0
    trace: str | None = None

    NEEDS = (Needs("downtime_s", lambda c: c.mtbf_s is not None, "elastic.churn.mtbf_s"),
             Needs("join_every_s", lambda c: c.joins > 0, "elastic.churn.joins"))

    def __post_init__(self) -> None:
        if self.mtbf_s is not None:
            require_float(self.mtbf_s, "elastic.churn.mtbf_s (mean seconds between a "
                          "worker's failures)", above=0)
        if self.downtime_s is not None:
            require_float(self.downtime_s, "elastic.churn.downtime_s", at_least=0)
        require_int(self.joins, "elastic.churn.joins", at_least=0, at_most=100_000)
        require_float(self.join_every_s, "elastic.churn.join_every_s", above=0)
        if self.trace is not None and not isinstance(self.trace, str):
            raise ConfigError(f"elastic.churn.trace must be a CSV file's path, got "
                              f"{shown(self.trace)}")
        check_needs(self, "elastic.churn.")

    @property
    def active(self) -> bool:
        return self.mtbf_s is not None or self.joins > 0 or self.trace is not None


@dataclass(frozen=True)
class ElasticConfig:
    """``elastic:``: worker ids, the quorum rule, the simulator's churn."""

    max_workers: int | None = None
    min_quorum: int = 1
    quorum_wait_s: float = 60.0
    churn: ChurnConfig = field(default_factory=ChurnConfig)

    def __post_init__(self) -> None:
        if self.max_workers is not None:
            require_int(self.max_workers, "elastic.max_workers", at_least=1,
                        at_most=100_000)
        require_int(self.min_quorum, "elastic.min_quorum", at_least=1)
        require_float(self.quorum_wait_s, "elastic.quorum_wait_s", at_least=0)

    def check(self, workers: int) -> None:
        """ConfigError unless the ids and counts fit a run of ``workers`` workers."""
        top = self.ids(workers)
        if top < workers:
            raise ConfigError(f"elastic.max_workers={top} is below workers={workers}; give "
                              f"at least {workers} (or leave it out: it defaults to workers)")
        if self.min_quorum > top:
            raise ConfigError(f"elastic.min_quorum={self.min_quorum} can never be met with "
                              f"at most {top} workers; give 1..{top}")
        if workers + self.churn.joins > top:
            raise ConfigError(f"elastic.churn.joins={self.churn.joins} needs max_workers >= "
                              f"{workers + self.churn.joins} (workers + joins), got {top}; "
                              f"set elastic.max_workers={workers + self.churn.joins}")

    def ids(self, workers: int) -> int:
        """How many worker ids the run has (``max_workers``, default ``workers``)."""
        return workers if self.max_workers is None else self.max_workers


def elastic_from_dict(d: Any) -> ElasticConfig:
    """An :class:`ElasticConfig` from the config's ``elastic:`` mapping (None: defaults);
    unknown keys and wrong types are one line."""
    if d is None:
        return ElasticConfig()
    if not isinstance(d, dict):
        raise ConfigError(f"elastic must be a mapping of options, got {shown(d)}; e.g. "
                          "elastic: {min_quorum: 2, churn: {mtbf_s: 600, downtime_s: 60}}")
    d = dict(d)
    churn = d.pop("churn", None)
    if churn is not None and not isinstance(churn, dict):
        raise ConfigError(f"elastic.churn must be a mapping of options, got {shown(churn)}; "
                          "e.g. churn: {mtbf_s: 600, downtime_s: 60}")
    return ElasticConfig(**_checked(ElasticConfig, d, "elastic", skip="churn"),
                         churn=ChurnConfig(**_checked(ChurnConfig, churn or {},
                                                      "elastic.churn")))


def _checked(cls: type, values: dict[str, Any], what: str, skip: str = "") -> dict[str, Any]:
    names = [f.name for f in fields(cls) if f.name != skip]
    for k in values:
        if k not in names:
            raise ConfigError(f"unknown {what} option {shown(k)}; choose one of: "
                              f"{', '.join(names + ([skip] if skip else []))}")
    return values


@dataclass(frozen=True)
class TraceEvent:
    """One row of a trace: at virtual ``time`` or at local ``step`` (the other None)."""

    worker: int
    event: str
    time: float | None = None
    step: int | None = None


def read_trace(path: str, workers: int, max_workers: int) -> list[TraceEvent]:
    """The events of trace file ``path``, checked (see the module docstring): time-keyed
    ones in time order (ties in file order), step-keyed ones in file order."""
    from .userfiles import read_text

    hint = "give a CSV file with a header such as worker,event,time"
    text = read_text(path, "churn trace", MAX_TRACE_BYTES, hint)
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not any(c.strip() for c in rows[0]):
        raise ConfigError(f"churn trace {path!r} is empty; {hint}")
    head = [c.strip().lower() for c in rows[0]]
    key = "time" if "time" in head else "step" if "step" in head else None
    if key is None or "worker" not in head or "event" not in head or \
            ("time" in head and "step" in head):
        raise ConfigError(f"churn trace {path!r} has columns {shown(head)}; it needs worker, "
                          "event and one of time (virtual seconds) or step (local steps)")
    if len(rows) - 1 > MAX_TRACE_ROWS:
        raise ConfigError(f"churn trace {path!r} has {len(rows) - 1:,} rows; at most "
                          f"{MAX_TRACE_ROWS:,}")
    col = {name: head.index(name) for name in ("worker", "event", key)}
    events = [_row(path, i + 2, r, col, key, max_workers)
              for i, r in enumerate(rows[1:]) if any(c.strip() for c in r)]
    if key == "time":
        events.sort(key=lambda e: e.time)  # stable: ties keep the file's order
    check_sequence(events, workers, max_workers, f"churn trace {path!r}")
    return events


def _row(path: str, line: int, r: list[str], col: dict[str, int], key: str,
         max_workers: int) -> TraceEvent:
    where = f"churn trace {path!r} line {line}"
    if len(r) <= max(col.values()):
        raise ConfigError(f"{where} has {len(r)} fields; it needs {len(col)} "
                          f"(worker, event, {key})")
    w, ev, k = (r[col["worker"]].strip(), r[col["event"]].strip().lower(),
                r[col[key]].strip())
    if not w.isdigit() or int(w) >= max_workers:
        raise ConfigError(f"{where}: worker {shown(w)} is not an id in 0..{max_workers - 1} "
                          "(elastic.max_workers bounds the ids)")
    if ev not in EVENTS:
        raise ConfigError(f"{where}: event {shown(ev)}; choose one of: {', '.join(EVENTS)}")
    if key == "step":
        if not k.isdigit() or len(k) > 15:
            raise ConfigError(f"{where}: step {shown(k)} must be a whole number >= 0")
        return TraceEvent(int(w), ev, step=int(k))
    try:
        t = float(k)
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or t < 0:
        raise ConfigError(f"{where}: time {shown(k)} must be a finite number of seconds >= 0")
    return TraceEvent(int(w), ev, time=t)


def check_sequence(events: list[TraceEvent], workers: int, max_workers: int,
                   where: str) -> None:
    """ConfigError unless the events make sense in order: a leave of a live worker, a
    rejoin of one that left, a join of an id never used (``workers .. max_workers-1``)."""
    live, gone = set(range(workers)), set()
    for e in events:
        w = e.worker
        bad = None
        if e.event == "leave" and w not in live:
            bad = "leaves but is not live then"
        elif e.event == "rejoin" and w not in gone:
            bad = "rejoins but has not left"
        elif e.event == "join" and (w in live or w in gone):
            bad = "joins but its id is already used (a join takes a new id; use rejoin)"
        if bad:
            at = f"t={e.time:g}" if e.step is None else f"step {e.step}"
            raise ConfigError(f"{where}: worker {w} {bad} ({e.event} at {at})")
        if e.event == "leave":
            live.discard(w)
            gone.add(w)
        else:
            gone.discard(w)
            live.add(w)
