"""``relaxsgd calibrate`` in the lab writes a profile the simulator loads; a dist run in
the lab reports its start-up apart and the network it really used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from relaxsgd.cli import main
from relaxsgd.lab.calibrate import fit_line
from test_lab import needs_lab

DELAY = 0.02
RELAX = [sys.executable, "-m", "relaxsgd.cli"]


def test_fit_line_recovers_a_line_and_clips_negative_terms() -> None:
    a, b = fit_line([[1e3, 0.1 + 1e3 * 2e-7], [1e6, 0.1 + 1e6 * 2e-7], [4e6, 0.1 + 0.8]])
    assert a == pytest.approx(0.1) and b == pytest.approx(2e-7)
    assert fit_line([[1.0, 0.5], [2.0, 0.4]])[1] == 0.0  # no negative cost per byte
    assert fit_line([[5.0, 0.3]]) == (0.3, 0.0)


def _lab(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*RELAX, "lab", "--workers", "2", "--latency", str(DELAY), "--",
                           *RELAX, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


@needs_lab
def test_calibrate_in_the_lab_writes_a_profile_that_the_simulator_uses(tmp_path: Path) -> None:
    prof = tmp_path / "lab.yaml"
    r = _lab(["calibrate", "--task", "logreg", "--out", str(prof)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "forwarder" in r.stderr  # the lab reports its forwarder's statistics
    p = yaml.safe_load(prof.read_text())
    net, comp = p["network"], p["compute"]
    # lower bounds are physics; the upper ones are loose (a loaded machine adds time)
    assert DELAY <= net["latency_s"] < 3 * DELAY
    a, _ = net["collectives"]["allreduce"]["2"]
    assert 3.5 * DELAY < a < 8 * DELAY  # gloo, n=2: four one-way latencies, not two
    a, _ = net["collectives"]["allgather"]["2"]
    assert 1.5 * DELAY < a < 5 * DELAY  # two
    assert comp["step_time_s"] > 0 and comp["flops_per_s"] > 0
    out = tmp_path / "sim"
    assert main(["run", "--task", "logreg", "--workers", "2", "--steps", "4", "--algo",
                 "allreduce", "--network", str(prof), "--compute", str(prof), "-q",
                 "--out", str(out)]) == 0
    res = json.loads((out / "result.json").read_text())
    assert res["compute_model"]["step_time_s"] == comp["step_time_s"]
    assert res["network_model"]["collectives"]["fits_used"]["allreduce@2"] == \
        net["collectives"]["allreduce"]["2"]


@needs_lab
def test_a_dist_run_in_the_lab_reports_start_up_and_the_real_network(tmp_path: Path) -> None:
    out = tmp_path / "d"
    steps = 6
    r = _lab(["run", "--runtime", "dist", "--workers", "2", "--task", "logreg", "--steps",
              str(steps), "--algo", "allreduce", "--evals", "1", "-q", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "result.json").read_text())
    assert res["network"] == "real"
    assert res["network_model"]["kind"] == "real" and "0.02 s" in res["network_model"]["lab"]
    st = res["dist"]["startup_s"]
    assert st["rendezvous_s"] > 0 and st["data_s"] > 0 and st["imports_s"] > 0
    # every step's gloo all-reduce takes four one-way latencies through the lab
    assert res["final"]["virtual_time_s"] >= steps * 4 * DELAY
