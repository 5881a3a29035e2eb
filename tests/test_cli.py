"""The command line: outputs, and every bad input as one line with exit status 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

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


def test_the_running_result_json_names_the_compute_and_network_models(tmp_path, capsys,
                                                                      monkeypatch) -> None:
    """result.json written after each evaluation (status "running") has the final one's
    ``compute_model`` and ``network_model``: a run killed midway still says what it
    modelled."""
    import relaxsgd.simulation as run_mod
    from relaxsgd.outputs import strict_json

    written: list[dict] = []
    real = run_mod.write_json

    def spy(path: str, obj: dict) -> None:
        if path.endswith("result.json"):
            written.append(json.loads(strict_json(obj)))
        real(path, obj)

    monkeypatch.setattr(run_mod, "write_json", spy)
    code, _, _ = run_cli(capsys, "run", "--algo", "localsgd", *QUICK, "--out",
                         str(tmp_path / "r"), "--network", "wan")
    assert code == 0
    running = [r for r in written if r["status"] == "running"]
    final = json.loads((tmp_path / "r" / "result.json").read_text())
    assert len(running) >= 2 and final["status"] == "completed"
    assert final["network_model"] and final["compute_model"]
    for r in running:
        assert r["compute_model"] == final["compute_model"]
        assert r["network_model"] == final["network_model"]


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
    (["run", "--workers", "-3"], "workers must be an integer >= 1, got -3"),
    (["run", "--lr", "abc"], "invalid float value: 'abc'"),
    (["run", "--lr", "-1"], "learning rate (train.lr) must be a finite number > 0, "
     "got -1.0"),
    (["run", "--steps", "0"], "steps (local steps per worker) must be an integer >= 1"),
    (["run", "--split", "weird"], "unknown split 'weird'; choose one of: iid"),
    (["run", "--runtime", "cloud"], "unknown runtime 'cloud'; choose one of: sim, dist"),
    (["run", "--set", "train.momentum=1.5"], "momentum (train.momentum) must be a finite "
     "number >= 0 and < 1, got 1.5"),
    (["run", "--set", "workers=many"], "workers must be an integer, got 'many'"),
    # integers go through require_int everywhere: 2.0 and '3' were taken as 2 and 3
    (["run", "--algo", "olco3", "--set", "p=2.0"], "algorithm 'olco3'.p must be an integer, "
     "got 2.0"),
    (["run", "--algo", "olco3", "--set", "s='3'"], "algorithm 'olco3'.s must be an integer, "
     "got '3'"),
    (["run", "--algo", "olco3", "--set", "p=true"], "algorithm 'olco3'.p must be an integer, "
     "got True"),
    (["run", "--algo", "olco3", "--set", "s=-1"], "olco3 option s (staleness in rounds) must "
     "be an integer in 0..63, got -1"),
    (["run", "--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' not found"),
    (["run", "--data-dir", "/nonexistent-dir"], "data directory '/nonexistent-dir' does not"),
    (["compare", "--algos", "allreduce,nosuch"], "unknown algorithm 'nosuch'"),
    # issue 11: silently wrong before, one line now
    (["run", "--steps", "3", "--epochs", "5"], "give --steps (local steps per worker) or "
     "--epochs"),
    (["compare", "--steps", "3", "--epochs", "5"], "or --epochs (passes over the training set)"
     ", not both"),
    (["run", "--task", "logreg", "--workers", "2", "--batch-size", "100000"],
     "batch size 100000 is larger than a worker's share of the training set (128 samples "
     "over 2 workers = 64); use --batch-size 64 or less"),
    (["run", "--set", "split.alpha=0.1"], "split 'iid' has no option 'alpha' (it takes no "
     "options)"),
    (["run", "--split", "shards", "--set", "split.alpha=0.1"], "split 'shards' has no option "
     "'alpha' (it takes split.shards_per_worker, split.min_size)"),
    (["run", "--split", "dirichlet", "--set", "split.alpha=-1"], "split.alpha must be a "
     "finite number > 0, got -1"),
    (["run", "--algo", "olco3", "--set", "algo.compressor=ef(ef(sign))"],
     "error feedback is applied once; write ef(sign)"),
    (["run", "--algo", "olco3", "--set", "algo.compressor=topk:ratio=0.01,k=5"],
     "compressor topk: give ratio or k, not both"),
    (["compare", "--algos", "localsgd,allreduce,localsgd"], "--algos names localsgd more "
     "than once"),
    (["compare", "--algos", ""], "--algos '' names no algorithm"),
    (["compare", "--algos", " , "], "names no algorithm"),
    (["run", "--set", "compute.heterogeneity=lognormal", "--set", "compute.sigma=nan"],
     "compute.sigma must be a finite number, got nan"),
    (["run", "--set", "compute.sigma=.nan"], "compute.sigma must be a finite number"),
    (["run", "--set", "compute.heterogeneity=stragglers", "--set", "compute.straggler_f=inf"],
     "compute.straggler_f must be a finite number, got inf"),
    (["run", "--set", "compute.straggler_f=.nan"], "compute.straggler_f must be a finite"),
    (["run", "--network", "custom", "--set", "network.jitter=nan"],
     "network.jitter must be a finite number >= 0, got nan"),
    (["run", "--set", "network.latency_s=-inf"], "network.latency_s must be a finite number"),
    (["run", "--set", "network.loss=1"], "network.loss must be a finite number >= 0 and < 1"),
    (["run", "--algo", "diloco", "--set", "algo.outer_lr=inf"], "algorithm 'diloco'.outer_lr"
     " must be a finite number, got inf"),
    (["run", "--epochs", "nan"], "epochs must be a finite number, got nan"),
    (["run", "--epochs", "-2"], "epochs must be a finite number > 0, got -2.0"),
    (["run", "--set", "compute.sigma=-1"], "compute.sigma must be a finite number >= 0, got -1"),
    (["run", "--set", "compute.straggler_f=0.5"], "compute.straggler_f must be a finite "
     "number >= 1, got 0.5"),
    (["run", "--step-time", "inf"], "compute.step_time_s must be a finite number > 0, got inf"),
    (["run", "--step-time", "-1"], "compute.step_time_s must be a finite number > 0, got -1.0"),
    (["run", "--seed", "-1"], "seed must be an integer in 0..9223372036854775807, got -1"),
    (["run", "--evals", "0"], "evals must be an integer >= 1, got 0"),
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
                           "--steps", "200", "--evals", "100", "--out", str(out),
                           "--set", "p=8")  # averaged often enough to spread the inf
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
    bad_graph = ["--topology", "hypercube", "--workers", "6", "--set", "task.n_train=192"]
    code, _, _ = run_cli(capsys, "run", "--algo", "allreduce", *QUICK, *bad_graph,
                         "--out", str(tmp_path / "ar"))
    assert code == 0
    code, _, err = run_cli(capsys, "run", "--algo", "dpsgd", *QUICK, *bad_graph)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "hypercube" in err and "6" in err


def test_the_default_job_gives_each_algorithm_its_own_training_options() -> None:
    """The default job's per-algorithm training options (defaults.ALGORITHM_TRAIN, e.g.
    OLCO3's tuned lr) reach `run` and every row of `compare`, whatever the order of
    --algos, only on their task; --lr and --set train.lr still win."""
    from relaxsgd.cli import build_parser
    from relaxsgd.compare import build_configs
    from relaxsgd.defaults import ALGORITHM_TRAIN, RECIPES
    from relaxsgd.jobargs import config_dict

    own = ALGORITHM_TRAIN["mnist1d"]["olco3"]["lr"]
    recipe = RECIPES["mnist1d"]["train"]["lr"]
    assert own != recipe

    def lrs(*argv: str) -> dict[str, float]:
        a = build_parser().parse_args(["compare", *argv])
        return {c.algo: c.train.lr for c in build_configs(a, a.algos.split(","))[1]}

    assert lrs("--algos", "swarm,olco3") == {"swarm": recipe, "olco3": own}
    assert lrs("--algos", "olco3,swarm") == {"olco3": own, "swarm": recipe}
    assert lrs("--algos", "olco3,swarm", "--lr", "0.05") == {"olco3": 0.05, "swarm": 0.05}
    assert lrs("--algos", "olco3,swarm", "--set", "train.lr=0.07") == {"olco3": 0.07,
                                                                        "swarm": 0.07}
    assert lrs("--algos", "olco3,swarm", "--task", "digits")["olco3"] == \
        RECIPES["digits"]["train"]["lr"]
    run = build_parser().parse_args(["run", "--algo", "olco3"])
    assert config_dict(run, "olco3")["train"]["lr"] == own
    run = build_parser().parse_args(["run", "--algo", "olco3", "--lr", "0.1"])
    assert config_dict(run, "olco3")["train"]["lr"] == 0.1


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


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("relaxsgd: error: "), err
    return lines[0]


def test_bad_paths_are_one_line(tmp_path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    for args, needle in [
        (["--out", str(afile)], f"--out {str(afile)!r} is a file, not a folder"),
        (["--out", str(afile / "sub")], "cannot write to output folder"),
        (["--config", str(binary)], f"config file {str(binary)!r} is not a text file"),
        (["--config", str(tmp_path)], f"config file {str(tmp_path)!r} is a folder"),
    ]:
        code, _, err = run_cli(capsys, "run", *QUICK, *args)
        assert code == 2, (args, err)
        assert needle in _one_error_line(err), (args, err)


def test_a_non_empty_out_is_refused_unless_force(tmp_path, capsys) -> None:
    out = tmp_path / "r"
    assert run_cli(capsys, "run", *QUICK, "--out", str(out))[0] == 0
    (out / "notes.txt").write_text("mine")
    before = (out / "result.json").stat().st_mtime_ns
    code, _, err = run_cli(capsys, "run", *QUICK, "--out", str(out), "--lr", "0.01")
    assert code == 2
    assert "is not empty" in _one_error_line(err) and "--force" in err
    assert (out / "result.json").stat().st_mtime_ns == before  # untouched
    code, _, _ = run_cli(capsys, "run", *QUICK, "--out", str(out), "--lr", "0.01", "--force")
    assert code == 0
    assert json.loads((out / "result.json").read_text())["status"] == "completed"
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    assert (out / "notes.txt").read_text() == "mine"
    code, _, err = run_cli(capsys, "compare", "--algos", "allreduce", *QUICK, "--out", str(out))
    assert code == 2 and "is not empty" in _one_error_line(err)


def test_error_hint_and_help_name_the_right_command(capsys) -> None:
    code, _, err = run_cli(capsys, "nosuchcmd")
    assert code == 2
    line = _one_error_line(err)
    assert "(see 'relaxsgd --help')" in line and "relaxsgd relaxsgd" not in line
    code, _, err = run_cli(capsys, "run", "--bogus")
    assert "(see 'relaxsgd run --help')" in _one_error_line(err)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "runs/<time>-<algo>-<task>-n<workers>" in " ".join(capsys.readouterr().out.split())


def test_run_saves_the_final_models_and_the_mean_model_gives_the_final_accuracy(
        tmp_path, capsys) -> None:
    from relaxsgd.bank import evaluate
    from relaxsgd.config import from_dict, load_yaml
    from relaxsgd.outputs import load_models, worker_state
    from relaxsgd.run import prepare

    out = tmp_path / "m"
    assert run_cli(capsys, "run", "--algo", "localsgd", *QUICK, "--out", str(out))[0] == 0
    models = load_models(str(out / "models.pt"))
    res = json.loads((out / "result.json").read_text())
    spec = prepare(from_dict(load_yaml(str(out / "config.yaml")))).spec
    model = spec.model_fn()
    model.load_state_dict(models["mean"])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    _, acc = evaluate(spec, model, flat, {}, spec.data.x_test, spec.data.y_test)
    assert acc == res["final"]["accuracy_mean_model"]
    model.load_state_dict(worker_state(models, 0))
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    _, acc0 = evaluate(spec, model, flat0, {}, spec.data.x_test, spec.data.y_test)
    assert acc0 == res["final"]["accuracy_worker0"] and models["ranks"] == [0, 1]


def _csv_without_wall(path: os.PathLike) -> list[dict[str, str]]:
    import csv

    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(f)]


def test_a_runs_config_yaml_reruns_the_same_run_into_a_new_folder(tmp_path, capsys,
                                                                   monkeypatch) -> None:
    first = tmp_path / "first"
    # a config file without a step time: the compute profile gives it, from the model's
    # FLOPs, and config.yaml must name the profile
    job = tmp_path / "job.yaml"
    job.write_text("algo: swarm\nalgo_options: {H: 2}\ntask: logreg\ntask_options: "
                   "{n_train: 128, n_test: 64}\nworkers: 2\nsteps: 6\nevals: 2\n")
    code, _, _ = run_cli(capsys, "run", "--config", str(job), "-q", "--out", str(first))
    assert code == 0
    profile = json.loads((first / "result.json").read_text())["compute_model"]["profile"]
    assert f"profile: {profile}" in (first / "config.yaml").read_text()
    cfg = (first / "config.yaml").read_text()
    assert "steps_per_worker" in cfg and "out:" not in cfg
    (first / "config.yaml").write_text(cfg + f"out: {first}\n")  # an old out: key
    before = sorted(os.listdir(first))
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "run", "--config", str(first / "config.yaml"), "-q",
                           "--out", str(again))
    assert code == 0, err
    assert _csv_without_wall(again / "metrics.csv") == _csv_without_wall(first / "metrics.csv")
    r1, r2 = (json.loads((d / "result.json").read_text()) for d in (first, again))
    for r in (r1, r2):
        for k in ("wall_time_s", "eval_wall_time_s", "eval_wall_share"):
            r["final"].pop(k)
    assert r1 == r2
    # without --out, the config's out: naming a finished run is not reused
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, "run", "--config", str(first / "config.yaml"), "-q")
    assert code == 0 and "already holds a run; writing to a new folder" in err
    assert sorted(os.listdir(first)) == before
    assert "outputs in runs/" in stdout


def test_a_measured_step_time_is_recorded_in_config_yaml(tmp_path, capsys) -> None:
    out = tmp_path / "m"
    code, _, err = run_cli(capsys, "run", "--algo", "localsgd", "--task", "logreg",
                           "--workers", "2", "--steps", "4", "--evals", "1", "-q",
                           "--step-time", "measure", "--out", str(out))
    assert code == 0, err
    res = json.loads((out / "result.json").read_text())
    assert res["compute_model"]["kind"] == "measured"
    assert f"step_time_s: {res['step_time_s']}" in (out / "config.yaml").read_text()


def test_divergence_writes_strict_json_with_the_reason(tmp_path, capsys) -> None:
    out = tmp_path / "div"
    code, _, err = run_cli(capsys, "run", "--algo", "localsgd", "--task", "quadratic",
                           "--workers", "2", "--step-time", "0.01", "-q", "--lr", "50",
                           "--steps", "200", "--evals", "100", "--out", str(out),
                           "--set", "p=8")  # averaged often enough to spread the inf
    assert code == 3
    text = (out / "result.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    res = json.loads(text)
    assert res["status"] == "diverged" and "diverged: loss" in res["message"]
    assert res["non_finite"]["final.loss_mean_model"] in ("inf", "nan")
    assert res["final"]["loss_mean_model"] is None
    assert (out / "models.pt").is_file()


def test_compare_goes_on_after_a_divergence_and_its_progress_reaches_100(tmp_path,
                                                                         capsys) -> None:
    """A diverged algorithm does not stop the comparison (its row says so), but the exit
    status is 3, as for a diverged run, with one line naming it."""
    out = tmp_path / "cmp"
    code, stdout, err = run_cli(capsys, "compare", "--algos", "diloco,localsgd", "--task",
                                "quadratic", "--workers", "2", "--steps", "61", "--evals", "3",
                                "--step-time", "0.01", "--set", "diloco.outer_lr=1000",
                                "--set", "diloco.p=2", "--out", str(out))
    # every algorithm ran and the summary is written, but the status says one diverged
    assert code == 3
    assert "relaxsgd: warning: diloco diverged: loss" in err and "comparison goes on" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("relaxsgd: error: 1 of 2 algorithms diverged (diloco;"), last
    assert "Traceback" not in err
    summary = (out / "summary.txt").read_text()
    lines = {ln.split()[0]: ln for ln in summary.splitlines()[2:]}
    assert lines["diloco"].rstrip().endswith("diverged")
    assert lines["localsgd"].rstrip().endswith("completed")
    assert (out / "accuracy_vs_time.png").is_file() and "diloco" in stdout
    # progress lines end at 100% (61 steps, 3 evaluations: the last one is at 68%)
    assert "localsgd on quadratic: 100%" in err


def _start(args: list[str], **kw: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "relaxsgd.cli", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, env=env, **kw)


def _wait_rows(path: os.PathLike, rows: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path) and open(path).read().count("\n") >= rows:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never reached {rows} rows")


LONG_RUN = ["--task", "logreg", "--workers", "4", "--steps", "200000", "--evals", "100000",
            "--step-time", "0.01"]


def test_a_second_ctrl_c_still_leaves_a_valid_result(tmp_path) -> None:
    out = tmp_path / "int2"
    proc = _start(["run", "--algo", "localsgd", *LONG_RUN, "--out", str(out)])
    try:
        _wait_rows(out / "metrics.csv", 3, proc)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    last = err.decode().strip().splitlines()[-1]
    base = f"relaxsgd: interrupted; what was measured so far is in {out}"
    # the first Ctrl-C asks for a checkpoint at the next safe point; the second stops at
    # once, unless the checkpoint was already saved (then the line says how to go on)
    assert last == base or (last.startswith(base + "; a checkpoint at local step")
                            and last.endswith(f"continue with 'relaxsgd resume {out}'")
                            and (out / "checkpoint.pt").is_file()), last
    res = json.loads((out / "result.json").read_text())
    assert res["status"] == "interrupted" and "last evaluation" in res["message"]
    assert (out / "models.pt").is_file()


def test_ctrl_c_during_start_up_is_one_line(tmp_path) -> None:
    proc = _start(["run", "--algo", "localsgd", *LONG_RUN, "--out", str(tmp_path / "s")])
    try:
        time.sleep(0.4)  # importing torch, or building the task
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert err.decode().strip().splitlines()[-1].startswith("relaxsgd: interrupted")
    res = tmp_path / "s" / "result.json"
    if res.exists():  # the run had started: its result says so
        assert json.loads(res.read_text())["status"] == "interrupted"


def test_compare_writes_its_summary_and_plots_when_interrupted(tmp_path) -> None:
    out = tmp_path / "cmpint"
    proc = _start(["compare", "--algos", "allreduce,localsgd", *LONG_RUN, "--out", str(out)])
    try:
        _wait_rows(out / "allreduce" / "metrics.csv", 3, proc)
        proc.send_signal(signal.SIGINT)
        stdout, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    summary = (out / "summary.txt").read_text()
    assert "allreduce" in summary and "interrupted" in summary
    assert (out / "accuracy_vs_time.png").is_file() and (out / "accuracy_vs_bytes.png").is_file()
    assert not (out / "localsgd").exists()  # never started


def test_list_gives_each_algorithm_its_membership(capsys) -> None:
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert "[gossip:" in lines["swarm"] and "[gossip:" in lines["adpsgd"]
    assert "[quorum:" in lines["localsgd"] and "[quorum:" in lines["olco3"]
    assert "[fixed:" in lines["dpsgd"] and "[fixed:" in lines["sgp"]


def test_list_into_a_closed_pipe_is_quiet() -> None:
    """`relaxsgd list | head -1`: the reader leaves early; no traceback on stderr."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; from relaxsgd.cli import main; "
                          "sys.exit(main(['list']))"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()  # the reader is gone before the first line is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "Traceback" not in err and err == ""
