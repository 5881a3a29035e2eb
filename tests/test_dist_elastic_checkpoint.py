"""Checkpoints of an elastic dist job (issue 20): rank 0 writes them, every worker resumes.

An elastic Local SGD job of 3 workers saves every 6 local steps; rank 0 (whose loss ends
an elastic job: it evaluates and writes the outputs) is killed at step 14. ``relaxsgd
resume`` then starts all 3 workers from rank 0's file at step 12: rank 0 as its own, the
others as newcomers taking it (live recovery from disk), and the run completes."""

from __future__ import annotations

import csv
import os
from typing import Any

import pytest
import torch

from distkit import resume_job, run_job
from test_dist_parity import BASE, N

pytestmark = pytest.mark.dist

ELASTIC = {"RELAXSGD_ELASTIC": "1"}


def _rows(out: str) -> list[dict[str, str]]:
    with open(os.path.join(out, "metrics.csv"), encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.timeout(150)
def test_an_elastic_job_resumes_every_worker_from_rank_0s_checkpoint(tmp_path: Any) -> None:
    cfg = {**BASE, "algo": "localsgd", "algo_options": {"p": 3}, "steps": 24, "evals": 4,
           "checkpoint_every": 6}
    out = str(tmp_path / "dist")
    r = run_job(cfg, N, out, timeout=60, env={**ELASTIC, "RELAXSGD_TEST_KILL_AT": "0:14"})
    assert r.codes[0] == -9, "\n".join(r.logs)
    files = sorted(f for f in os.listdir(out) if f.startswith("checkpoint-"))
    assert files == ["checkpoint-rank0-at12.pt"], files  # rank 0's only, the newest
    rs = resume_job(out, N, timeout=60, env=ELASTIC)
    assert rs.codes == [0] * N, "\n".join(rs.logs)
    assert rs.result is not None and rs.result["status"] == "completed"
    # every worker went on from step 12 (rank 0's), in the same rounds: one model at the end
    assert rs.result["final"]["steps_per_worker"] == 24
    assert rs.models is not None and rs.models.shape[0] == N
    assert torch.equal(rs.models[1], rs.models[0]) and torch.equal(rs.models[2], rs.models[0])
    steps = [float(row["step"]) for row in _rows(out)]
    # the rows before 12 kept, then on (the last: every worker's final snapshot, as in any
    # run)
    assert steps == [0.0, 6.0, 12.0, 18.0, 24.0, 24.0], steps
