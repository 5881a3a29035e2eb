"""The distributed runtime's parameter server (a thread of rank 0, gloo, 2 and 3 processes):
the models of the replicated-server emulation (pskit, simulated in-process), the bytes of
the simulator's server, and a server that dies fails the run with one line naming it."""

from __future__ import annotations

import signal
import time
from typing import Any

import pytest
import torch

from distkit import run_job, run_jobs, wait_for_rows
from pskit import emulated
from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate

pytestmark = pytest.mark.dist

BASE: dict[str, Any] = {
    "task": "logreg", "task_options": {"n_train": 480, "n_test": 200, "dim": 8, "classes": 4},
    "steps": 12, "evals": 2, "compute": {"step_time_s": 0.002}, "batching": "loop",
    "split": "shards", "train": {"batch_size": 8, "lr": 0.1, "momentum": 0.9},
}
TWO_WAY = {"compressor": "topk:ratio=0.25", "aggregation": "ps",
           "server_compressor": "topk:ratio=0.1"}  # server error feedback: on by default
OLCO3 = [("olco3", {"p": 2, "s": s, **TWO_WAY}) for s in (0, 1, 2)]
EFSGD = ("efsgd", {"compressor": "topk:ratio=0.25", "aggregation": "ps",
                   "server_compressor": "qsgd:bits=2"})  # a random server compressor
JOBS = {2: [OLCO3[0], OLCO3[2]], 3: [OLCO3[1], EFSGD]}


def _cfg(algo: str, opts: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, "algo": algo, "algo_options": opts}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n", [2, 3])
def test_the_server_gives_the_emulations_models_and_the_simulators_bytes(
        n: int, tmp_path: Any) -> None:
    cases = JOBS[n]
    runs = run_jobs([_cfg(*c) for c in cases], n, str(tmp_path), timeout=90)
    for (algo, opts), r in zip(cases, runs, strict=True):
        assert r.codes == [0] * n, "\n".join(r.logs)
        cfg = from_dict({**_cfg(algo, opts), "workers": n})
        emu = simulate(emulated(prepare(cfg)))
        assert r.models is not None
        torch.testing.assert_close(r.models, emu.bank.X, rtol=1e-5, atol=2e-6)
        sim = simulate(prepare(cfg))  # the simulator's server: the same declared bytes
        res = r.result
        assert res is not None and res["status"] == "completed"
        assert res["final"]["bytes_sent_total"] == sim.result["final"]["bytes_sent_total"]
        assert sim.engine.server_bytes > 0


LONG: dict[str, Any] = {**_cfg("olco3", {"p": 2, "s": 1, **TWO_WAY}), "steps": 100000,
                        "evals": 2000}


@pytest.mark.timeout(90)
def test_a_server_that_dies_fails_a_synchronous_run_with_one_line_naming_it(tmp_path) -> None:
    out = str(tmp_path)
    t: dict[str, float] = {}

    def after(job: Any) -> None:
        assert wait_for_rows(out, 3)
        t["t"] = time.monotonic()
        job.signal(signal.SIGKILL, [0])  # rank 0, and the server thread with it
        while any(job.procs[r].poll() is None for r in (1, 2)):
            if time.monotonic() - t["t"] > 60:
                return
            time.sleep(0.02)
        t["dt"] = time.monotonic() - t["t"]

    r = run_job(LONG, 3, out, timeout=60, after=after, env={"RELAXSGD_TIMEOUT": "30"})
    assert r.codes[0] == -signal.SIGKILL
    assert r.codes[1:] == [5, 5], r.logs
    for rank in (1, 2):
        errors = [line for line in r.logs[rank].splitlines() if "error" in line]
        assert len(errors) == 1, r.logs[rank]
        assert "the parameter server (a thread of worker 0) is lost" in errors[0]
        assert "connection closed without a goodbye" in errors[0]
    assert t["dt"] < 10  # at once, not after RELAXSGD_TIMEOUT=30
