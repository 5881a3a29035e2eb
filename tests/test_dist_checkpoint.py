"""Checkpoints and resume in the distributed runtime (2 gloo processes on loopback).

A run killed (SIGKILL of one worker) after a checkpoint and resumed with ``relaxsgd
resume`` under 2 processes ends with the same models and metrics as the same run never
interrupted, with the same checkpoint schedule; a damaged, foreign or incomplete
checkpoint, and a resume with another number of processes, end every process with one
line and exit status 2.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import time
from typing import Any

import pytest
import torch

from distkit import resume_job, run_job, run_jobs, wait_for_rows

pytestmark = pytest.mark.dist

BASE: dict[str, Any] = {
    "task": "logreg", "task_options": {"n_train": 480, "n_test": 200, "dim": 8, "classes": 4},
    "steps": 24, "evals": 6, "checkpoint_every": 5,
    "train": {"batch_size": 8, "lr": 0.05, "momentum": 0.9},
}
CASES: dict[str, dict[str, Any]] = {
    "allreduce": {"algo": "allreduce"},
    # top-k 1% through a parameter server (the default), an aggregation in flight at
    # every checkpoint
    "olco3": {"algo": "olco3", "algo_options": {"p": 2, "s": 1}},
}
# long enough to be signalled while it runs; checkpoints only when stopped
SIGNALLED: dict[str, Any] = {**BASE, **CASES["olco3"], "steps": 400, "evals": 20,
                             "checkpoint_every": None, "compute": {"step_time_s": 0.005}}
TIMES = ("wall_time_s", "virtual_time_s", "stall_time_s_mean")
# counted when a collective completes: at an evaluation point of a run with aggregations
# in flight (OLCO3) they depend on timing, even between two uninterrupted runs
COUNTS = ("bytes_sent_total", "bytes_sent_per_worker_max", "messages_total",
          "bits_per_param_per_step", "bytes_per_worker_per_step")


def rows(folder: str) -> list[dict[str, str]]:
    with open(os.path.join(folder, "metrics.csv"), encoding="utf-8") as f:
        return list(csv.DictReader(f))


def without(r: dict[str, str], keys: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in r.items() if k not in keys}


def one_line_errors(logs: list[str]) -> list[str]:
    """The last line of each process's output, which must be its only error line."""
    out = []
    for log in logs:
        lines = [x for x in log.strip().splitlines() if x.startswith("relaxsgd")]
        errs = [x for x in lines if x.startswith("relaxsgd: error:")]
        assert len(errs) == 1 and "Traceback" not in log, log
        out.append(errs[0])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: Any) -> dict[str, Any]:
    """Both cases uninterrupted (one job), and each killed after its checkpoint at 10."""
    root = tmp_path_factory.mktemp("ckpt")
    whole = run_jobs([{**BASE, **c} for c in CASES.values()] + [SIGNALLED], 2,
                     str(root / "whole"), timeout=120)
    assert whole[0].codes == [0, 0], whole[0].logs
    cut = {}
    for (name, c), kill in zip(CASES.items(), [(1, 13), (0, 13)], strict=True):
        out = str(root / f"cut-{name}")
        r = run_job({**BASE, **c}, 2, out, timeout=120, kill=kill)
        assert r.codes[kill[0]] == -9 and r.result is not None, r.logs
        # rank 0 killed: the result.json of its last evaluation ("running") is left
        assert r.result["status"] == ("running" if kill[0] == 0 else "failed")
        assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == [
            "checkpoint-rank0-at10.pt", "checkpoint-rank1-at10.pt", "checkpoint.pt"]
        shutil.copytree(out, str(root / f"spare-{name}"))  # for the error tests
        cut[name] = out
    return {"whole": dict(zip([*CASES, "signalled"], whole, strict=True)), "cut": cut,
            "root": root}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(CASES))
def test_a_killed_run_resumes_exactly(name: str, runs: dict[str, Any]) -> None:
    whole, out = runs["whole"][name], runs["cut"][name]
    before = rows(out)
    # as if rank 0 had written its part of the next set when the job died: the set at
    # 15 is incomplete, so the resume must take the one at 10 (and never read this)
    with open(os.path.join(out, "checkpoint-rank0-at15.pt"), "wb") as f:
        f.write(b"half a checkpoint")
    r = resume_job(out, 2, timeout=120)
    assert r.codes == [0, 0], r.logs
    assert r.result is not None and r.result["status"] == "completed"
    assert r.models is not None and torch.equal(r.models, whole.models)
    a, b = rows(whole.out), rows(out)
    assert len(a) == len(b) >= 7
    assert without(a[-1], TIMES) == without(b[-1], TIMES)  # the final state, all of it
    skip = TIMES + (COUNTS if name == "olco3" else ())
    for ra, rb in zip(a, b, strict=True):
        assert without(ra, skip) == without(rb, skip)
    # the rows up to the checkpoint (step 10: evaluation points 0, 4, 8) came from the
    # file, not from running again: the same wall times as before the kill
    assert [x["wall_time_s"] for x in b[:3]] == [x["wall_time_s"] for x in before[:3]]
    assert float(b[3]["wall_time_s"]) > float(before[2]["wall_time_s"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["truncate", "foreign"])
def test_a_damaged_or_foreign_checkpoint_is_one_line(damage: str, runs: dict[str, Any],
                                                     tmp_path: Any) -> None:
    out = str(tmp_path / "r")
    shutil.copytree(str(runs["root"] / "spare-allreduce"), out)
    path = os.path.join(out, "checkpoint-rank1-at10.pt")
    if damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        torch.save({"format": "something-else", "x": torch.zeros(2)}, path)
    r = resume_job(out, 2, timeout=90)
    assert r.codes == [2, 2], r.logs
    for line in one_line_errors(r.logs):
        assert "worker 1" in line and path in line
        assert ("cannot be read" if damage == "truncate" else "not a relaxsgd checkpoint") \
            in line


@pytest.mark.timeout(120)
def test_a_resume_with_another_world_size_is_one_line(runs: dict[str, Any],
                                                      tmp_path: Any) -> None:
    out = str(tmp_path / "r")
    shutil.copytree(str(runs["root"] / "spare-allreduce"), out)
    r = resume_job(out, 3, timeout=90)
    assert r.codes == [2, 2, 2], r.logs
    for line in one_line_errors(r.logs):
        assert "has 2 workers and this job 3 processes" in line
        assert "--nproc-per-node 2" in line


@pytest.mark.timeout(120)
def test_an_incomplete_checkpoint_set_is_one_line(runs: dict[str, Any],
                                                  tmp_path: Any) -> None:
    """A kill between two ranks' writes: rank 1 has no file of the position rank 0 has."""
    out = str(tmp_path / "r")
    shutil.copytree(str(runs["root"] / "spare-allreduce"), out)
    os.unlink(os.path.join(out, "checkpoint-rank1-at10.pt"))
    r = resume_job(out, 2, timeout=90)
    assert r.codes == [2, 2], r.logs
    for line in one_line_errors(r.logs):
        assert "no complete checkpoint" in line and "worker(s) [1]" in line


@pytest.mark.timeout(300)
def test_sigterm_to_one_worker_checkpoints_every_worker_then_resume_finishes(
        runs: dict[str, Any], tmp_path: Any) -> None:
    """SIGTERM to worker 1 only: it tells worker 0, which has every worker stop at one
    common safe point; each saves its part and ends with the signal's status and one line
    naming ``relaxsgd resume``; the resumed run ends as the run never stopped (a
    checkpoint changes no parameter of a synchronous algorithm)."""
    out = str(tmp_path / "r")

    def after(job: Any) -> None:
        assert wait_for_rows(out, 3)
        job.signal(signal.SIGTERM, [1])

    r = run_job(SIGNALLED, 2, out, timeout=120, after=after)
    assert r.codes == [143, 143], r.logs
    for log in r.logs:
        last = log.strip().splitlines()[-1]
        assert last.startswith("relaxsgd: interrupted; a checkpoint at local step") and \
            f"continue with 'relaxsgd resume {out}'" in last, log
    assert r.result is not None and r.result["status"] == "interrupted"
    files = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-rank"))
    assert len(files) == 2 and files[0].replace("rank0", "rank1") == files[1], files
    stopped_at = float(files[0].rsplit("-at", 1)[1][:-3])
    assert 0 < stopped_at < 400
    r = resume_job(out, 2, timeout=120)
    assert r.codes == [0, 0], r.logs
    whole = runs["whole"]["signalled"]
    assert r.models is not None and torch.equal(r.models, whole.models)
    a, b = rows(whole.out), rows(out)
    assert len(a) == len(b) and without(a[-1], TIMES) == without(b[-1], TIMES)
    for ra, rb in zip(a, b, strict=True):
        assert without(ra, TIMES + COUNTS) == without(rb, TIMES + COUNTS)


@pytest.mark.timeout(240)
def test_an_asynchronous_algorithm_resumes_each_worker_from_its_own_last_file(
        tmp_path: Any) -> None:
    """The test gossip (``Algorithm.asynchronous``), worker 1 twice as slow: the workers
    save without a barrier, so when the job is killed their files are at different
    positions, and each resumes from its own (no common position exists)."""
    out = str(tmp_path / "r")
    cfg = {**BASE, "algo": "gossip", "steps": 60, "evals": 6, "checkpoint_every": 10,
           "compute": {"step_time_s": 0.02, "heterogeneity": "fixed",
                       "speed_factors": [1, 2]}}
    got: dict[str, list[str]] = {}

    def after(job: Any) -> None:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            have = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-rank")) \
                if os.path.isdir(out) else []
            if any(f.startswith("checkpoint-rank1-at") for f in have) and \
                    not any(f.endswith("-at10.pt") for f in have):
                break
            time.sleep(0.01)
        job.signal(signal.SIGKILL)
        got["files"] = have

    r = run_job(cfg, 2, out, timeout=120, after=after)
    assert r.codes == [-9, -9], r.logs
    files = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-rank"))
    assert len(files) == 2, files  # one file per worker: the older ones are gone
    at = [float(f.rsplit("-at", 1)[1][:-3]) for f in files]
    assert at[0] > at[1] >= 20, files  # worker 0 is ahead
    before = rows(out)
    kept = len(torch.load(os.path.join(out, files[0]), weights_only=True)["run"]["rows"])
    r = resume_job(out, 2, timeout=120)
    assert r.codes == [0, 0], r.logs
    assert r.result is not None and r.result["status"] == "completed"
    assert r.result["final"]["steps_per_worker"] == 60
    b = rows(out)
    # the rows rank 0 had when it saved come from its file; points some worker had passed
    # before its file and others had not get no row; the steps go on increasing
    assert 1 <= kept <= len(before)
    assert [x["wall_time_s"] for x in b[:kept]] == [x["wall_time_s"] for x in before[:kept]]
    steps = [float(x["step"]) for x in b]
    assert steps == sorted(steps) and steps[-1] == 60 and len(b) > kept, steps
    assert float(b[-1]["interactions"]) > 0


@pytest.mark.timeout(120)
def test_a_second_signal_stops_at_once_and_a_double_one_is_one(tmp_path: Any) -> None:
    """Two SIGTERMs 0.1 s apart (torchrun's agent sends two at once) are one request: the
    workers go on towards their next safe point (here 5 s of computing away); one more,
    a second later, stops them at once, without a checkpoint."""
    out = str(tmp_path / "r")
    cfg = {**BASE, "algo": "localsgd", "algo_options": {"p": 1000}, "steps": 2000,
           "checkpoint_every": None, "compute": {"step_time_s": 0.005}}
    t: dict[str, Any] = {}

    def after(job: Any) -> None:
        assert wait_for_rows(out, 1)
        job.signal(signal.SIGTERM)
        time.sleep(0.1)  # (two at once would be merged into one pending signal)
        job.signal(signal.SIGTERM)
        time.sleep(1.5)
        t["running"] = [p.poll() is None for p in job.procs]
        t["t"] = time.monotonic()
        job.signal(signal.SIGTERM)
        while any(p.poll() is None for p in job.procs) and time.monotonic() - t["t"] < 30:
            time.sleep(0.02)
        t["dt"] = time.monotonic() - t["t"]

    r = run_job(cfg, 2, out, timeout=90, after=after)
    assert t["running"] == [True, True], r.logs
    assert r.codes == [130, 130], r.logs
    assert t["dt"] < 5
    assert all("going on to the next safe point" in lg for lg in r.logs)
    assert not [f for f in os.listdir(out) if f.startswith("checkpoint")]


@pytest.mark.timeout(180)
def test_sigterm_stops_an_asynchronous_run_worker_by_worker_then_resume_finishes(
        tmp_path: Any) -> None:
    """The test gossip (asynchronous): each worker saves at its own next safe point after
    the signal, without waiting for the other, and ends; the resume finishes the run."""
    out = str(tmp_path / "r")
    cfg = {**BASE, "algo": "gossip", "steps": 300, "evals": 10, "checkpoint_every": None,
           "compute": {"step_time_s": 0.01}}

    def after(job: Any) -> None:
        assert wait_for_rows(out, 2)
        job.signal(signal.SIGTERM)

    r = run_job(cfg, 2, out, timeout=120, after=after)
    assert r.codes == [143, 143], r.logs
    assert all(f"continue with 'relaxsgd resume {out}'" in lg for lg in r.logs)
    files = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-rank"))
    assert [f[:len("checkpoint-rank0")] for f in files] == ["checkpoint-rank0",
                                                             "checkpoint-rank1"], files
    r = resume_job(out, 2, timeout=120)
    assert r.codes == [0, 0], r.logs
    assert r.result is not None and r.result["status"] == "completed"
    assert r.result["final"]["steps_per_worker"] == 300


def test_swarm_killed_after_its_checkpoints_resumes_and_finishes(tmp_path: Any) -> None:
    """SwarmSGD's async schedule (asynchronous: saved worker by worker, lattice state,
    published copies, a handler generator) killed with SIGKILL once both workers have a
    file: the resumed job finishes the run from the files, gossiping again."""
    out = str(tmp_path / "r")
    cfg = {**BASE, "algo": "swarm", "steps": 400, "evals": 8, "checkpoint_every": 50,
           "compute": {"step_time_s": 0.002}}

    def after(job: Any) -> None:
        end = time.monotonic() + 90
        while time.monotonic() < end:
            have = [f for f in os.listdir(out) if f.startswith("checkpoint-rank")] \
                if os.path.isdir(out) else []
            if {f[:len("checkpoint-rank0")] for f in have} == {"checkpoint-rank0",
                                                                "checkpoint-rank1"}:
                break
            time.sleep(0.01)
        job.signal(signal.SIGKILL)

    r = run_job(cfg, 2, out, timeout=120, after=after)
    if r.codes == [0, 0]:
        pytest.skip("the run ended before it could be killed (machine too fast)")
    assert r.codes == [-9, -9], r.logs
    files = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-rank"))
    saved = [torch.load(os.path.join(out, f), weights_only=True) for f in files]
    r = resume_job(out, 2, timeout=120)
    assert r.codes == [0, 0], r.logs
    assert r.result is not None and r.result["status"] == "completed"
    assert r.result["final"]["steps_per_worker"] == 400
    # the resumed workers gossiped: more interactions than the files held
    held = sum(s["worker"]["counters"].get("interactions_per_worker", 0) for s in saved)
    assert r.result["final"]["interactions_per_worker"] > held
