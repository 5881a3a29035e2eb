"""Checkpoints of the distributed runtime: every worker saves its own part.

(An elastic job's checkpoints are rank 0's alone, resumed by every worker:
:mod:`.elastic_saving`.)

When a checkpoint is due at a worker's safe point (``yield Checkpoint()``: the run's
``checkpoint_every`` local steps reached at its position, or a checkpoint asked for by a
signal, see :mod:`.stopping`), the executor hands over to :meth:`DistCheckpoints.take`:

1. wait for every handle still in flight in ``w.state`` and for the main program's spawns
   (the time is stall);
2. synchronous algorithms only: a small all-reduce (MAX) on a process group of its own
   (never mixed with the program's collectives), which agrees on the set's position (the
   largest of the workers' positions) and lets rank 0 wait until its evaluator has
   recorded every row up to the checkpoint;
3. write ``checkpoint-rank<k>-at<position>.pt`` atomically (:func:`relaxsgd.checkpoint.save`:
   plain data, read back with ``torch.load(weights_only=True)``): the worker's bank row
   (:func:`~relaxsgd.checkpoint.bank_state`), ``w.state``, its generator and counters
   (:func:`~relaxsgd.checkpoint.worker_state`), the executor's counters (bytes, messages,
   stall, collectives, spawns, wall clock), the job's (evaluation schedule, compute time);
   rank 0 also the metrics rows so far;
4. synchronous: a second all-reduce (every rank's file of the set is on disk), then each
   rank deletes its older files; rank 0 writes ``checkpoint.pt``, a small manifest naming
   the position, the world size and the config (for people and for ``relaxsgd resume``'s
   checks; the rank files are the truth).

Resume (:func:`load_for_resume`): the ranks agree through the rendezvous store, before any
process group exists. A synchronous run resumes from the newest position for which EVERY
rank has a file (a kill between two ranks' writes leaves the previous complete set, kept
until the next one is complete), and the resumed run equals the run never interrupted with
the same checkpoint schedule (metrics.csv apart from times, models.pt: a test). An
asynchronous algorithm (``Algorithm.asynchronous``: SwarmSGD, AD-PSGD) saves without any
barrier, each worker at its own safe points, and resumes each worker from its own last
file: messages in flight at the kill are lost and the workers restart from different
moments, so such a resume is a valid continuation, not the same run; evaluation points
that some worker had passed before its file and others had not are skipped (no row).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from ..errors import ConfigError, RelaxError
from ..state_tree import decode, pending_handles
from ..state_tree import encode as ckpt_state
from .collectives import DHandle, _on_work

_NAME = re.compile(r"^checkpoint-rank(\d+)-at([0-9][0-9.e+-]*)\.pt$")


def position_tag(pos: float) -> str:
    return str(int(pos)) if float(pos).is_integer() else repr(float(pos))


def rank_file(folder: str, rank: int, pos: float) -> str:
    return os.path.join(folder, f"checkpoint-rank{rank}-at{position_tag(pos)}.pt")


def rank_positions(folder: str, rank: int) -> list[float]:
    """The positions of this rank's checkpoint files in ``folder``, ascending."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            m = _NAME.match(name)
            if m and int(m.group(1)) == rank:
                with contextlib.suppress(ValueError):
                    p = float(m.group(2))
                    if math.isfinite(p):
                        found.append(p)
    return sorted(found)


def synchronous(algo: Any) -> bool:
    """Whether a checkpoint set needs every worker (see the module docstring)."""
    return not getattr(algo, "asynchronous", False)


def done_handle(value: Any) -> DHandle:
    h = DHandle("restored")
    h.resolve(value)
    return h


class DistCheckpoints:
    """The checkpoints of one worker of a dist run (see the module docstring).

    ``job_state()`` is the job's part of the file (and ``run_state()`` rank 0's: rows,
    evaluation index); ``wait_rows(k)`` (rank 0) returns once evaluation point k - 1 is
    recorded."""

    def __init__(self, every: Any, folder: str, rank: int, n: int, resolved: dict[str, Any],
                 sync: bool, bank: Any, job_state: Callable[[], dict[str, Any]],
                 run_state: Callable[[], dict[str, Any]] | None = None,
                 wait_rows: Callable[[int], None] | None = None) -> None:
        self.every = ckpt.parse_every(every)
        self.folder, self.rank, self.n, self.resolved = folder, rank, n, resolved
        self.sync, self.bank = sync, bank
        self.job_state, self.run_state, self.wait_rows = job_state, run_state, wait_rows
        steps = self.every is not None and self.every[0] == "steps"
        self.ckpt_at: float | None = self.every[1] if steps else None
        self.group = dist.new_group(list(range(n))) if sync else None  # all ranks create it
        self.requests: Any = None  # a .stopping.Requests: checkpoints asked for now
        self.asked_now = False
        self.saved = 0

    # -- the schedule ------------------------------------------------------------------
    def due(self, pos: float) -> bool:
        self.asked_now = self.requests is not None and self.requests.due(pos)
        return self.asked_now or (self.ckpt_at is not None and pos >= self.ckpt_at)

    def _advance_schedule(self, pos: float) -> None:
        if self.every is not None and self.every[0] == "steps":
            self.ckpt_at = ckpt.next_position(self.every[1], pos)

    # -- taking one ----------------------------------------------------------------------
    def take(self, ex: Any, pos: float, ctx: Any) -> None:
        """Save this worker's part at its safe point ``pos`` (in the program's thread)."""
        with ex.lock:
            waiting = pending_handles(ex.w.state)
        for h in waiting:  # results in flight are kept in the handles (stall)
            ex._block(h, ctx)
        for ev in list(ex.slot_last):
            if ev is not None:
                ex._wait_event(ev, ctx, "a spawn still running at the safe point")
        job = self.job_state()
        at = pos
        if self.sync:
            got = self._all_max(ex, ctx, [pos, float(job["snap_next"])], "checkpoint barrier")
            at = got[0]
            if self.rank == 0 and self.wait_rows is not None:
                self.wait_rows(int(got[1]))
        self._write(ex, at, job)
        if self.sync:
            self._all_max(ex, ctx, [1.0], "checkpoint commit")
        if self.rank == 0:
            ckpt.save(os.path.join(self.folder, ckpt.FILE), {
                "runtime": "dist", "config": self.resolved, "position": at,
                "world_size": self.n, "synchronous": self.sync,
                "files": [os.path.basename(rank_file(self.folder, r, at))
                          for r in (range(self.n) if self.sync else [0])]})
        for old in rank_positions(self.folder, self.rank):
            if old < at:
                with contextlib.suppress(OSError):
                    os.unlink(rank_file(self.folder, self.rank, old))
        self._advance_schedule(max(pos, at))
        self.saved += 1
        if self.asked_now:
            self.requests.taken(at)  # raises StoppedAtCheckpoint after a signal

    def _write(self, ex: Any, at: float, job: dict[str, Any]) -> None:
        from ..checkpoint import bank_state, worker_state

        with ex.lock:  # handlers of an asynchronous algorithm may touch the state
            payload = {"runtime": "dist", "config": self.resolved, "position": at,
                       "rank": self.rank, "world_size": self.n, "synchronous": self.sync,
                       "bank": bank_state(self.bank), "worker": worker_state(ex.w),
                       "executor": executor_state(ex), "job": job}
        if self.run_state is not None:
            payload["run"] = self.run_state()
        ckpt.save(rank_file(self.folder, self.rank, at), payload)

    def _all_max(self, ex: Any, ctx: Any, values: list[float], what: str) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=ex.device)
        h = DHandle(what, collective=True)
        _on_work(h, dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group,
                                    async_op=True))
        ex._block(h, ctx)
        return t.cpu().tolist()


def executor_state(ex: Any) -> dict[str, Any]:
    c = ex.counts
    return {"bytes": c.bytes, "messages": c.messages, "wire": c.wire + ex.tr.wire_bytes,
            "server_bytes": c.server_bytes, "server_messages": c.server_messages,
            "stall": ex.stall, "coll_seq": ex.coll_seq, "spawns": ex.spawns,
            "wall": ex.now(), "last_pos": ex.last_pos, "server_seq": ex.server_seq,
            # rank 0: the parameter server's state (.server), saved like a worker's
            "server": (ckpt_state(ex.server_host.state_dict())
                       if ex.server_host is not None else None)}


def restore(ck: dict[str, Any], ex: Any, bank: Any, eval_wire: float) -> None:
    """Put this rank's file back into a freshly built worker, bank and executor."""
    from ..checkpoint import load_bank_state, load_worker_state

    load_bank_state(bank, ck["bank"])
    load_worker_state(ex.w, ck["worker"], done_handle)
    s, c = ck["executor"], ex.counts
    c.bytes, c.messages = s["bytes"], int(s["messages"])
    c.wire = s["wire"] - eval_wire
    c.server_bytes, c.server_messages = s["server_bytes"], int(s["server_messages"])
    ex.stall, ex.coll_seq, ex.spawns = s["stall"], int(s["coll_seq"]), int(s["spawns"])
    ex.last_pos = float(s["last_pos"])
    ex.wall_offset = float(s["wall"])
    ex.server_seq = int(s["server_seq"])
    if ex.server_host is not None:
        if s["server"] is None:
            raise ValueError("rank 0's checkpoint has no parameter server state")
        ex.server_host.load_state_dict(decode(s["server"], done_handle, ex.device))


# -- resuming --------------------------------------------------------------------------

def _agree(store: Any, rank: int, n: int, key: str, mine: Any) -> list[Any]:
    """Every rank's ``mine`` (JSON), through the rendezvous store."""
    store.set(f"resume/{key}/{rank}", json.dumps(mine))
    got = [json.loads(store.get(f"resume/{key}/{r}").decode()) for r in range(n)]
    # rank 0 may host the store: it leaves (on an error) only once everyone has read
    store.set(f"resume/{key}-read/{rank}", "1")
    if rank == 0:
        store.wait([f"resume/{key}-read/{r}" for r in range(n)])
    return got


def load_for_resume(store: Any, folder: str, rank: int, n: int, resolved: dict[str, Any],
                    sync: bool) -> tuple[dict[str, Any], int]:
    """This rank's checkpoint to resume from, and the evaluation index every rank goes on
    from; the same ConfigError (one line) on every rank if any rank's file is missing,
    damaged, foreign or of another run or world size."""
    err = ""
    manifest = os.path.join(folder, ckpt.FILE)
    if rank == 0 and os.path.exists(manifest):
        try:
            m = ckpt.load(manifest, "dist", resolved)
            if m.get("world_size") != n:
                err = (f"the checkpoint in {folder!r} was written by {m.get('world_size')} "
                       f"worker processes and this job has {n}; resume it with "
                       f"torchrun --nproc-per-node {m.get('world_size')}")
        except ConfigError as e:
            err = str(e)
    mine = rank_positions(folder, rank)
    lists = _agree(store, rank, n, "positions", {"have": mine, "error": err})
    errors = [x["error"] for x in lists if x["error"]]
    if errors:
        raise ConfigError(errors[0])
    if sync:
        common = set(lists[0]["have"]).intersection(*(set(x["have"]) for x in lists[1:]))
        if not common:
            missing = [r for r, x in enumerate(lists) if not x["have"]]
            raise ConfigError(f"no complete checkpoint in {folder!r}: worker(s) {missing or 'all'}"
                              " have no checkpoint file there for the positions the others"
                              " have (the run never reached one; give --checkpoint-every)")
        at: float | None = max(common)
    else:
        at = mine[-1] if mine else None
    ck, err = None, ""
    try:
        if at is None:
            raise ConfigError(f"no checkpoint of worker {rank} in {folder!r} (the run never "
                              "reached one; give --checkpoint-every)")
        ck = _load_rank(rank_file(folder, rank, at), rank, n, resolved)
    except ConfigError as e:
        err = f"worker {rank}: {e}"
    nexts = _agree(store, rank, n, "loaded", {"error": err, "next": _next_index(ck)})
    errors = [x["error"] for x in nexts if x["error"]]
    if errors:
        raise ConfigError(errors[0])
    assert ck is not None
    return ck, max(int(x["next"]) for x in nexts)


def _next_index(ck: dict[str, Any] | None) -> int:
    if ck is None:
        return 0
    k = int(ck["job"]["snap_next"])
    return max(k, int(ck["run"]["next_index"])) if "run" in ck else k


def _load_rank(path: str, rank: int, n: int, resolved: dict[str, Any]) -> dict[str, Any]:
    ck = ckpt.load(path, "dist", resolved)
    if ck.get("rank") != rank or ck.get("world_size") != n:
        raise ConfigError(f"checkpoint {path!r} is worker {ck.get('rank')!r}'s of a job of "
                          f"{ck.get('world_size')!r} processes, not worker {rank}'s of {n}")
    for key in ("bank", "worker", "executor", "job"):
        if not isinstance(ck.get(key), dict):
            raise ConfigError(f"checkpoint {path!r} has no {key!r} part: it is damaged")
    if rank == 0 and not isinstance(ck.get("run"), dict):
        raise ConfigError(f"checkpoint {path!r} has no 'run' part: it is damaged")
    return ck


class CheckpointFailed(RelaxError):
    """A checkpoint could not be taken (a disk full, a worker's state not plain data)."""


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise CheckpointFailed(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.005)


# -- the job's side (.runtime._Job) --------------------------------------------------------

def job_state(job: Any) -> dict[str, Any]:
    """What a checkpoint keeps of ``job`` itself (its snapshot schedule and counters)."""
    return {"snap_next": job.snap.next, "compute_time": job.compute_time,
            "units": job.units, "eval_wire": job.eval_wire}


def minutes_of(saver: DistCheckpoints) -> float | None:
    """The wall-clock period of ``saver``'s schedule, if it saves every so many minutes."""
    every = saver.every
    return every[1] if every is not None and every[0] == "minutes" else None


def restore_own(job: Any, ck: dict[str, Any], next_index: int) -> None:
    """Put ``ck``, this rank's own file, back into ``job`` (rank 0: the metrics rows too)."""
    restore(ck, job.ex, job.bank, float(ck["job"]["eval_wire"]))
    j = ck["job"]
    job.compute_time, job.units = float(j["compute_time"]), int(j["units"])
    job.snap.next = next_index
    if job.ex.saver is not None:
        job.ex.saver._advance_schedule(float(ck["position"]))
    if job.rank == 0:
        job.rec.restore(ck["run"]["rows"])
        job.evaluator.next_index = next_index


def attach(job: Any, out: str, resolved: dict[str, Any]) -> DistCheckpoints:
    """The checkpoints of ``job`` (a ``runtime._Job``), saved in ``out``."""
    os.makedirs(out, exist_ok=True)

    def run_state() -> dict[str, Any]:
        return {"rows": [dict(r) for r in job.rec.rows],
                "next_index": job.evaluator.next_index}

    def wait_rows(k: int) -> None:
        ev = job.evaluator
        wait_until(lambda: ev.next_index >= k or ev.error is not None, job.opts.timeout_s,
                   f"recording the metrics rows up to evaluation point {k - 1}")

    from .stopping import Requests

    first, sync = job.rank == 0, synchronous(job.prep.algo)
    saver = DistCheckpoints(job.cfg.checkpoint_every, out, job.rank, job.n, resolved, sync,
                            job.bank, lambda: job_state(job), run_state if first else None,
                            wait_rows if first else None)
    saver.requests = Requests(job.ex, job.stop, sync, minutes_of(saver), out)
    return saver


def resume_job(job: Any, store: Any, ck: dict[str, Any], next_index: int) -> None:
    """Put this rank's checkpoint into the freshly built ``job``; if any rank fails, every
    rank raises the same ConfigError (agreed through the store)."""
    err = ""
    try:
        restore_own(job, ck, next_index)
    except ckpt.RESTORE_ERRORS as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        err = f"worker {job.rank}: its checkpoint cannot be restored (damaged?): {why}"
    errors = [e for e in _agree(store, job.rank, job.n, "restored", err) if e]
    if errors:
        raise ConfigError(errors[0])
