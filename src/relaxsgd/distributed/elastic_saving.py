"""Checkpoints of an elastic dist job: rank 0 writes them, every worker resumes from them.

A non-elastic job's checkpoint is a consistent cut of every worker's file, agreed on with
barriers of a process group (:mod:`.saving`); an elastic job has neither a process group
nor a fixed set of workers. Here the checkpoint is what live recovery hands a newcomer
(:mod:`.handover`), written to disk by one worker: rank 0, the lowest live id while the
job lives (it evaluates and writes the outputs, so the job ends with it: that loss is
what these checkpoints are for; a lost worker of another id comes back by live recovery).

- **Saving.** Rank 0 saves at its own safe points on the run's ``checkpoint_every``
  schedule, without any barrier (as an asynchronous algorithm's worker does): it first
  waits for the handles in flight in ``w.state`` (and its spawns), as a donor does, then
  writes ``checkpoint-rank0-at<position>.pt`` (its bank row, ``w.state``, generator,
  counters, the parameter server's state, the metrics rows so far, and the byte and time
  counters of every other worker from its last snapshot) and the manifest
  ``checkpoint.pt``. After a signal (SIGTERM, Ctrl-C) rank 0 saves at its next safe point
  and ends; the other workers end at once (the quorum goes on without them meanwhile).
- **Resuming** (``relaxsgd resume OUT`` under the launcher, the same number of processes):
  every worker reads rank 0's newest file. Rank 0 restores it as its own. Every other
  worker takes it as a newcomer takes a donor's handover: the parameters, optimizer state,
  buffers, step, ``w.state`` and the round counters, then ``Algorithm.adopt(w, 0)``; it
  keeps its own data shard with a sampler from the start of its stream and its own random
  stream, and takes its counters from rank 0's record. So a resume is a valid
  continuation from rank 0's state, not the run that was never interrupted.
"""

from __future__ import annotations

import os
from typing import Any

from .. import checkpoint as ckpt
from ..errors import ConfigError
from .handover import apply
from .saving import (
    DistCheckpoints,
    _load_rank,
    _next_index,
    job_state,
    minutes_of,
    rank_file,
    rank_positions,
    restore_own,
)
from .stopping import Requests

COUNTERS = ("bytes", "messages", "server_bytes", "server_messages", "stall", "wire",
            "compute_time", "units", "samples")
METRICS = ("counters", "obs_sum", "obs_count")  # a worker's algorithm metrics (dicts)


class _OwnRequests(Requests):
    """Rank 0's requests: its own signal or period only (no one else saves, so no one is
    told: the others end at once on a signal)."""

    def _tell(self, msg: tuple) -> None:
        return None


def attach(job: Any, out: str, resolved: dict[str, Any]) -> DistCheckpoints | None:
    """Rank 0's checkpoints of the elastic ``job`` (None on the other workers)."""
    if job.rank != 0:
        return None
    os.makedirs(out, exist_ok=True)

    def run_state() -> dict[str, Any]:
        ev = job.evaluator
        return {"rows": [dict(r) for r in job.rec.rows], "next_index": ev.next_index,
                "peers": {str(r): {**{k: float(s[k]) for k in COUNTERS},
                                   **{k: dict(s[k]) for k in METRICS}}
                          for r, s in sorted(ev.last.items()) if r != 0}}

    saver = DistCheckpoints(job.cfg.checkpoint_every, out, 0, job.n, resolved, False,
                            job.bank, lambda: job_state(job), run_state, None)
    saver.requests = _OwnRequests(job.ex, job.stop, False, minutes_of(saver), out)
    return saver


def load(folder: str, resolved: dict[str, Any], n: int) -> tuple[dict[str, Any], int]:
    """Rank 0's newest checkpoint in ``folder`` and the evaluation index to go on from
    (every worker reads the same file); one line if there is none or it is foreign."""
    manifest = os.path.join(folder, ckpt.FILE)
    if os.path.exists(manifest):
        m = ckpt.load(manifest, "dist", resolved)
        if m.get("world_size") != n:
            raise ConfigError(f"the checkpoint in {folder!r} was written by a job of "
                              f"{m.get('world_size')} workers and this job has {n}; resume "
                              f"it with relaxsgd.distributed.launch -n {m.get('world_size')}")
    have = rank_positions(folder, 0)
    if not have:
        raise ConfigError(f"no checkpoint of worker 0 in {folder!r} (the run never reached "
                          "one; give --checkpoint-every)")
    ck = _load_rank(rank_file(folder, 0, have[-1]), 0, n, resolved)
    # Go on from the first evaluation rank 0 had not recorded: rank 0 saves without a
    # barrier, so its own snapshot for an evaluation may be shipped (snap_next past it)
    # while the others' had not come in; every worker (at the checkpoint's step) ships that
    # one again. (saving._next_index's max is right only after the barrier's agreement:
    # here it lost the row, seen 1 run in 3.)
    # The rows themselves say how many were recorded (a row's "eval" is the number of
    # rows before it: Recorder.record); the evaluator's own counter is read from another
    # thread than its rows (seen one behind them: a row twice).
    run = ck.get("run")
    rows = run.get("rows") if isinstance(run, dict) else None
    return ck, len(rows) if isinstance(rows, list) else _next_index(ck)


def resume(job: Any, store: Any, ck: dict[str, Any], next_index: int) -> None:
    """Put rank 0's checkpoint into the freshly built ``job`` (see the module docstring)."""
    try:
        (_as_owner if job.rank == 0 else _as_newcomer)(job, ck, next_index)
    except ckpt.RESTORE_ERRORS as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"worker {job.rank}: worker 0's checkpoint cannot be restored "
                          f"(damaged?): {why}") from None
    if job.el is not None:
        job.el.resumed()


def _as_owner(job: Any, ck: dict[str, Any], next_index: int) -> None:
    """Rank 0: its own file back (.saving.resume_job without the agreement of every
    rank's files: there is one)."""
    restore_own(job, ck, next_index)


def _as_newcomer(job: Any, ck: dict[str, Any], next_index: int) -> None:
    """Take rank 0's file as a handover from worker 0 (.handover.apply), then adopt."""
    bank, ex = ck["bank"], ck["executor"]
    got = {"model": {"X": bank["X"][0], "M": bank["M"][0], "V": bank["V"][0],
                     "buffers": bank["buffers"][0], "step": int(bank["steps"][0])},
           "state": ck["worker"]["state"],
           "runtime": {"coll_seq": ex["coll_seq"], "server_seq": ex["server_seq"],
                       "spawns": ex["spawns"], "last_pos": ex["last_pos"],
                       "snap_next": next_index, "wall": ex["wall"]}}
    apply(job, got)
    job.ex.wall_offset = float(ex["wall"])  # (the clock starts when the run does)
    mine = ck.get("run", {}).get("peers", {}).get(str(job.rank))
    if isinstance(mine, dict) and all(isinstance(mine.get(k), float) for k in COUNTERS) \
            and all(isinstance(mine.get(k), dict) for k in METRICS):
        c, w = job.ex.counts, job.w  # (as of this worker's last snapshot rank 0 recorded)
        c.bytes, c.messages = mine["bytes"], int(mine["messages"])
        c.server_bytes, c.server_messages = mine["server_bytes"], \
            int(mine["server_messages"])
        c.wire = mine["wire"]
        job.ex.stall = mine["stall"]
        job.compute_time, job.units = mine["compute_time"], int(mine["units"])
        w.counters, w.obs_sum = dict(mine["counters"]), dict(mine["obs_sum"])
        w.obs_count, w.samples = dict(mine["obs_count"]), int(mine["samples"])
    with job.ex.lock:
        job.prep.algo.adopt(job.w, 0)
