"""The command line: outputs, and every bad input as one line with exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from relaxsgd.cli import main

QUICK = ["--task", "logreg", "--workers", "2", "--steps", "4", "--evals", "2",
         "--step-time", "0.01", "-q", "--set", "task.n_train=128", "--set", "task.n_test=64"]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's own errors
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_run_writes_config_metrics_result_and_plots(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    code, stdout, _ = run_cli(capsys, "run", "--algo", "localsgd", *QUICK, "--out", str(out),
                              "--set", "p=2", "--network", "wan")
    assert code == 0
    assert "localsgd" in stdout and "acc mean" in stdout
    for f in ("config.yaml", "metrics.csv", "result.json", "accuracy_vs_time.png",
              "accuracy_vs_bytes.png"):
        assert (out / f).is_file(), f
    res = json.loads((out / "result.json").read_text())
    for k in ("algorithm", "task", "workers", "runtime", "seed"):
        assert k in res
    for k in ("accuracy_mean_model", "accuracy_worker0", "loss_mean_model", "virtual_time_s",
              "wall_time_s", "steps_per_worker", "bytes_sent_total",
              "bytes_sent_per_worker_max", "messages_total", "stall_time_s_mean",
              "consensus_distance", "samples_total"):
        assert k in res["final"], k
    assert res["final"]["steps_per_worker"] == 4 and res["algo_options"]["p"] == 2
    assert res["final"]["samples_total"] == 2 * 4 * 32
    assert "p: 2" in (out / "config.yaml").read_text()


def test_list_names_every_kind(capsys) -> None:
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    for word in ("allreduce", "localsgd", "mnist1d", "cifar10", "wan", "dirichlet"):
        assert word in out


@pytest.mark.parametrize("args, needle", [
    (["run", "--algo", "nosuch"], "unknown algorithm 'nosuch'; choose one of: allreduce"),
    (["run", "--task", "nosuch"], "unknown task 'nosuch'; choose one of:"),
    (["run", "--network", "lan"], "unknown network profile 'lan'; choose one of: datacenter"),
    (["run", "--set", "bogus=1"], "unknown option 'bogus'"),
    (["run", "--set", "algo.bogus=1"], "unknown algorithm 'localsgd' option 'bogus'"),
    (["run", "--set", "task.bogus=1"], "unknown option 'bogus' for task"),
    (["run", "--set", "noequals"], "--set expects key=value"),
    (["run", "--workers", "-3"], "workers must be a positive integer, got -3"),
    (["run", "--lr", "abc"], "invalid float value: 'abc'"),
    (["run", "--lr", "-1"], "learning rate must be a positive number, got -1.0"),
    (["run", "--steps", "0"], "steps (local steps per worker) must be a positive integer"),
    (["run", "--split", "weird"], "unknown split 'weird'; choose one of: iid"),
    (["run", "--runtime", "cloud"], "unknown runtime 'cloud'; choose one of: sim, dist"),
    (["run", "--set", "train.momentum=1.5"], "momentum must be in [0, 1), got 1.5"),
    (["run", "--set", "workers=many"], "workers must be a int, got 'many'"),
    (["run", "--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' not found"),
    (["run", "--data-dir", "/nonexistent-dir"], "data directory '/nonexistent-dir' does not"),
    (["compare", "--algos", "allreduce,nosuch"], "unknown algorithm 'nosuch'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, needle) -> None:
    code, _, err = run_cli(capsys, *args, *QUICK[-4:])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("relaxsgd: error: ")
    assert needle in lines[0], lines[0]


def test_bad_yaml_and_missing_data_files(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: [unclosed\n")
    code, _, err = run_cli(capsys, "run", "--config", str(bad))
    assert code == 2 and "is not valid YAML" in err and len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_cli(capsys, "run", "--task", "mnist", "--data-dir", str(empty), "-q")
    assert code == 2 and "train-images-idx3-ubyte" in err
    assert len(err.strip().splitlines()) == 1


def test_divergence_names_step_and_worker_and_keeps_outputs(tmp_path, capsys) -> None:
    out = tmp_path / "div"
    code, _, err = run_cli(capsys, "run", "--algo", "localsgd", "--task", "quadratic",
                           "--workers", "2", "--step-time", "0.01", "-q", "--lr", "50",
                           "--steps", "200", "--evals", "100", "--out", str(out))
    assert code == 3
    assert "diverged" in err and "local step" in err and "worker" in err
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "diverged"
    assert (out / "metrics.csv").read_text().count("\n") >= 2


def test_ctrl_c_stops_cleanly_and_keeps_outputs(tmp_path) -> None:
    out = tmp_path / "int"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaxsgd.cli", "run", "--algo", "localsgd", "--task", "logreg",
         "--workers", "4", "--steps", "200000", "--evals", "100000", "--step-time", "0.01",
         "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 60
        metrics = out / "metrics.csv"
        while time.time() < deadline:
            if metrics.exists() and metrics.read_text().count("\n") >= 3:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "interrupted"


def test_topology_is_ignored_by_allreduce_but_checked_for_gossip(tmp_path, capsys) -> None:
    bad_graph = ["--topology", "hypercube", "--workers", "6"]
    code, _, _ = run_cli(capsys, "run", "--algo", "allreduce", *QUICK, *bad_graph,
                         "--out", str(tmp_path / "ar"))
    assert code == 0
    code, _, err = run_cli(capsys, "run", "--algo", "dpsgd", *QUICK, *bad_graph)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "hypercube" in err and "6" in err


def test_compare_with_steps_and_per_algorithm_options(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    code, stdout, _ = run_cli(capsys, "compare", "--algos", "allreduce,localsgd", *QUICK,
                              "--set", "localsgd.p=3", "--out", str(out))
    assert code == 0 and "localsgd" in stdout
    res = json.loads((out / "localsgd" / "result.json").read_text())
    assert res["algo_options"]["p"] == 3 and res["final"]["steps_per_worker"] == 4
    assert (out / "summary.txt").is_file() and (out / "accuracy_vs_time.png").is_file()


def test_compare_checks_every_algorithms_options_before_running(tmp_path, capsys) -> None:
    out = tmp_path / "cmpbad"
    code, _, err = run_cli(capsys, "compare", "--algos", "localsgd,olco3", *QUICK,
                           "--set", "olco3.bogus=1", "--out", str(out))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown algorithm 'olco3' option 'bogus'" in err
    assert not out.exists()  # nothing ran, nothing half-written
