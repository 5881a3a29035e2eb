"""relaxsgd tune: the search finds a known best, spaces are checked against the options,
a killed tune resumes without losing a finished trial, a best config.yaml reruns to its
trial's figures, and bad input is one line with exit 2."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from relaxsgd.cli import main
from relaxsgd.errors import ConfigError
from relaxsgd.tune.objective import parse_objective
from relaxsgd.tune.space import check_declared
from relaxsgd.tune.trial import run_trial

TINY = ["--task", "logreg", "--workers", "2", "--steps", "40", "--evals", "4",
        "--set", "task.n_train=400", "--set", "task.n_test=200"]


def _tune(tmp_path, name: str, *extra: str) -> tuple[int, str]:
    out = str(tmp_path / name)
    rc = main(["tune", "--algos", "localsgd", "--objective", "final", "-q", *TINY,
               "--out", out, *extra])
    return rc, out


def _rows(out: str) -> list[dict[str, str]]:
    import csv

    with open(os.path.join(out, "trials.csv"), encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- the search ---------------------------------------------------------------------------

QUAD = {"task": "quadratic", "workers": 1, "steps": 30, "evals": 2, "algo": "localsgd",
        "algo_options": {"p": 1}, "train": {"batch_size": 16, "momentum": 0.0},
        "network": "datacenter", "compute": {"step_time_s": 0.01}}


def test_study_finds_the_best_learning_rate_of_a_quadratic(tmp_path):
    # the known best: a grid of learning rates run directly (loss after 30 SGD steps)
    obj = parse_objective("final:loss")
    grid = [10 ** (-2 + 0.25 * i) for i in range(11)]  # 0.01 .. 3.2
    losses = {lr: run_trial({**QUAD, "train": {**QUAD["train"], "lr": lr}}, obj).value
              for lr in grid}
    finite = {lr: v for lr, v in losses.items() if v is not None and math.isfinite(v)}
    best_lr = min(finite, key=finite.get)
    assert 0.02 < best_lr < 2.0  # an interior optimum: too small is slow, too big diverges
    path = tmp_path / "job.yaml"
    import yaml

    path.write_text(yaml.safe_dump({**QUAD, "train": {**QUAD["train"], "lr": 0.01}}))
    space = tmp_path / "space.yaml"
    space.write_text("train.lr: {low: 0.01, high: 3.2, log: true}\ntrain.momentum: 0.0\n"
                     "train.warmup_steps: 0\n")
    out = str(tmp_path / "quad")
    assert main(["tune", "--algos", "localsgd", "--config", str(path), "--objective",
                 "final:loss", "--space", str(space), "--trials", "12", "--no-prune",
                 "--set", "localsgd.p=1", "-q", "--out", out]) == 0
    found = json.load(open(os.path.join(out, "localsgd", "trial.json")))
    lr = found["settings"]["train.lr"]
    # within a factor 2 of the grid's best learning rate, and as good as the grid's best
    assert best_lr / 2 <= lr <= best_lr * 2, (lr, best_lr)
    assert found["value"] <= finite[best_lr] * 1.05


LOGREG = {"task": "logreg", "workers": 2, "steps": 40, "evals": 8, "algo": "localsgd",
          "task_options": {"n_train": 400, "n_test": 200}, "network": "datacenter",
          "compute": {"step_time_s": 0.01}, "train": {"lr": 0.1}}


def test_a_time_to_trial_stops_at_the_target_or_past_the_best_time():
    obj = parse_objective("time-to:accuracy=0.38")
    whole = run_trial(LOGREG, parse_objective("final:accuracy"))
    first = run_trial(LOGREG, obj)
    assert first.status == "complete" and first.reached and first.message.startswith(
        "stopped at the target") and first.evals < whole.evals
    # a bound it beats changes nothing; one it cannot beat stops it at the first
    # evaluation past the bound, as a pruned trial that scores worse than the bound
    again = run_trial(LOGREG, obj, bound=first.value * 1.01)
    assert (again.status, again.value, again.evals) == ("complete", first.value, first.evals)
    from relaxsgd.config import from_dict
    from relaxsgd.run import prepare, simulate

    times = [r["virtual_time_s"] for r in simulate(prepare(from_dict(
        {**LOGREG, "out": None}))).rows]
    bound = first.value * 0.3
    beaten = run_trial(LOGREG, obj, bound=bound)
    assert beaten.status == "pruned" and "past the best time" in beaten.message
    assert not beaten.reached and beaten.value > first.value
    past = next(k for k, t in enumerate(times) if t > bound)
    assert (beaten.evals, beaten.virtual_time_s) == (past + 1, times[past])


def test_pruning_compares_trials_at_equal_progress():
    """A trial that evaluates at few, late steps (a long period) reports each evaluation
    where it lies on the job's grid of evaluations, from its local steps, not at its
    index: else successive halving compares it with other trials at unequal progress."""
    from relaxsgd.config import from_dict
    from relaxsgd.run import prepare, simulate

    job = {**LOGREG, "algo_options": {"p": 13}}
    prep = prepare(from_dict({**job, "out": None}))
    steps = [r["step"] for r in simulate(prep).rows]
    grid = sorted({min(8, int(s * 8 / prep.total_steps)) for s in steps} - {0})
    assert len(grid) < len(steps) - 1 and grid[0] > 1  # sparse evaluations, first late
    seen: list[int] = []
    out = run_trial(job, parse_objective("final:loss"),
                    prune=lambda k, v: seen.append(k) or False)
    assert out.status == "complete" and seen == grid


def test_successive_halving_waits_a_quarter_of_the_job(tmp_path):
    """Early evaluations say little about the time to a target: however bad a trial looks
    against the finished ones, it is not pruned before a quarter of its evaluations."""
    import optuna

    from relaxsgd.tune.study import halving

    for evals in (20, 60):
        study = optuna.create_study(pruner=halving(evals), storage=optuna.storages.
                                    InMemoryStorage())
        for k in range(6):  # finished trials, good at every evaluation
            t = study.ask()
            for step in range(1, evals + 1):
                t.report(10.0 - k, step)  # each better than the last: never pruned
                assert not t.should_prune()  # (the pruner records its rungs here)
            study.tell(t, 10.0 - k)
        t = study.ask()
        pruned_at = None
        for step in range(1, evals + 1):
            t.report(1e6, step)  # far worse than every other trial
            if t.should_prune():
                pruned_at = step
                break
        assert pruned_at == evals // 4, (evals, pruned_at)


# -- spaces -------------------------------------------------------------------------------

def test_every_declared_space_is_checked_against_its_options(monkeypatch):
    from relaxsgd.algorithms import ALGORITHMS
    from relaxsgd.tune.params import Float, Int

    for name in ALGORITHMS.names():
        check_declared(name)  # every shipped space names real options, bounds accepted
    cls = ALGORITHMS.get("localsgd")
    monkeypatch.setattr(cls, "search_space", {"q": Int(1, 8)})
    with pytest.raises(ConfigError, match="'q', which is not one of its options"):
        check_declared("localsgd")
    monkeypatch.setattr(cls, "search_space", {"p": Int(0, 8)})  # p >= 1
    with pytest.raises(ConfigError, match="out of range"):
        check_declared("localsgd")
    monkeypatch.setattr(ALGORITHMS.get("diloco"), "search_space",
                        {"outer_momentum": Float(0.0, 1.5)})  # momentum < 1
    with pytest.raises(ConfigError, match="out of range"):
        check_declared("diloco")


@pytest.mark.parametrize("text,needle", [
    ("algo.q: {low: 1, high: 4}\n", "has no option 'algo.q'"),
    ("algo.p: {low: 1, high: 500}\n", "outside the declared range"),
    ("train.momentum: 1.5\n", "out of range"),
    ("swarm:\n  algo.H: 4\n", "which --algos does not tune"),
])
def test_a_bad_space_file_is_one_line(tmp_path, capsys, text, needle):
    space = tmp_path / "space.yaml"
    space.write_text(text)
    rc, out = _tune(tmp_path, "t", "--space", str(space), "--trials", "1")
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


# -- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize("extra,needle", [
    (["--algos", "nosuch"], "unknown algorithm 'nosuch'"),
    (["--objective", "time-to:bpc=2.0"], "reports no bits per character"),
    (["--objective", "final:perplexity"], "unknown metric"),
    (["--trials", "0"], "--trials must be at least 1"),
    (["--time", "0m"], "must be more than zero"),
    (["--budget-bytes", "0"], "must be a positive size"),
    (["--budget-vtime", "0"], "--budget-vtime must be a positive number"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, needle):
    out = str(tmp_path / "bad")
    argv = ["tune", "--algos", "localsgd", *TINY, "--out", out, "-q"]
    rc = main(argv + extra)
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(out)


# -- a tune, killed and resumed; its best config reruns -----------------------------------

def _finished(db: str, running: bool = False) -> list[tuple[int, str]]:
    cond = "state = 'RUNNING'" if running else "state != 'RUNNING' and state != 'WAITING'"
    try:
        with sqlite3.connect(db, timeout=30) as c:
            return c.execute(f"select number, state from trials where {cond} "
                             "order by number").fetchall()
    except sqlite3.Error:
        return []


def test_killed_tune_resumes_and_keeps_every_finished_trial(tmp_path, capsys):
    rc, whole = _tune(tmp_path, "whole", "--trials", "4", "--no-prune")
    assert rc == 0 and len(_rows(whole)) == 4
    out = str(tmp_path / "killed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "relaxsgd.cli", "tune", "--algos",
                             "localsgd", "--objective", "final", "-q", *TINY,
                             "--set", "steps=120", "--out", out, "--trials", "4",
                             "--no-prune"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    db = os.path.join(out, "study.db")
    t0 = time.time()
    # kill it in the middle of its third trial
    while not (len(_finished(db)) >= 2 and _finished(db, running=True)) \
            and time.time() - t0 < 120 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _finished(db)
    assert len(before) == 2 and _finished(db, running=True), before
    with sqlite3.connect(db) as c:
        values = dict(c.execute("select trial_id, value from trial_values").fetchall())
    assert main(["tune", "--resume", out, "-q"]) == 0
    rows = _rows(out)
    assert len(rows) == 4  # as many as the uninterrupted tune
    assert {r["status"] for r in rows} == {"complete"}
    with sqlite3.connect(db) as c:
        after = dict(c.execute("select trial_id, value from trial_values").fetchall())
    assert all(after[k] == v for k, v in values.items())  # nothing finished was lost
    assert [n for n, _ in before] == [n for n, _ in _finished(db)][: len(before)]
    with sqlite3.connect(db) as c:  # the killed trial is kept as such, and ran again
        killed = c.execute("select count(*) from trial_user_attributes where key = 'status' "
                           "and value_json = '\"killed\"'").fetchone()[0]
    assert killed == 1
    capsys.readouterr()
    # a folder holding a tune is refused for a new one (resume it instead)
    assert main(["tune", "--algos", "localsgd", *TINY, "--out", out, "-q"]) == 2
    assert "holds another tune" in capsys.readouterr().err


def test_a_resumed_tune_has_what_is_left_of_its_time_budget(tmp_path, capsys):
    from relaxsgd.tune.study import Plan, load_studies, record_spent, spent

    t0 = time.time()
    rc, out = _tune(tmp_path, "t", "--trials", "1", "--no-prune")
    took = time.time() - t0
    plan = Plan.load(out)
    assert rc == 0 and 0 < spent(load_studies(plan, out)) <= took  # recorded
    # earlier sessions spent 100 s: a 60 s budget is used up (a budget restarted at each
    # resume would run trials up to --trials)
    record_spent(load_studies(plan, out), 100.0)
    assert main(["tune", "--resume", out, "--time", "60s", "--trials", "30", "-q"]) == 0
    assert len(_rows(out)) == 1
    assert spent(load_studies(Plan.load(out), out)) >= 100.0
    # 57 s of 60 spent: trials start for the 3 s left, not up to --trials
    record_spent(load_studies(plan, out), 57.0)
    assert main(["tune", "--resume", out, "--time", "60s", "--trials", "30", "-q"]) == 0
    assert 1 < len(_rows(out)) < 30
    assert spent(load_studies(Plan.load(out), out)) > 57.0


def test_a_running_default_counts_when_choosing_whose_turn_it_is():
    from types import SimpleNamespace as NS

    from optuna.trial import TrialState

    from relaxsgd.tune.study import next_algo

    done = NS(user_attrs={"default": True, "status": "complete"}, state=TrialState.COMPLETE)
    studies = {"localsgd": NS(user_attrs={}, get_trials=lambda deepcopy: [done]),
               # diloco's default is running in another process: recorded when it ends
               "diloco": NS(user_attrs={"default_claim": "123"}, get_trials=lambda deepcopy: [])}
    plan = NS(algos=["localsgd", "diloco"], trials=3)
    assert next_algo(plan, studies) == "localsgd"  # one each: the first in order
    studies["diloco"].user_attrs = {}
    assert next_algo(plan, studies) == "diloco"


def test_best_config_reruns_to_its_trials_figures(tmp_path, capsys):
    rc, out = _tune(tmp_path, "t", "--trials", "3", "--objective", "time-to:accuracy=0.3")
    assert rc == 0
    trial = json.load(open(os.path.join(out, "localsgd", "trial.json")))
    assert trial["reached"] is True
    run = str(tmp_path / "rerun")
    assert main(["run", "--config", os.path.join(out, "localsgd", "config.yaml"), "--out",
                 run, "-q"]) == 0
    from relaxsgd.runs import read_rows

    rows = read_rows(run)
    first = next(r for r in rows if r["accuracy_mean_model"] >= 0.3)
    assert first["virtual_time_s"] == pytest.approx(trial["value"], rel=1e-9)
    assert first["accuracy_mean_model"] == pytest.approx(trial["metric"], rel=1e-9)
    assert first["bytes_sent_per_worker_max"] == trial["bytes_per_worker"]
    capsys.readouterr()
    assert main(["report", out]) == 0
    shown = capsys.readouterr().out
    assert "localsgd" in shown and "virtual time to accuracy >= 0.3" in shown
    for f in ("trials.csv", "report.md", "objective_over_trials.png", "study.db"):
        assert os.path.isfile(os.path.join(out, f)), f
    # later trials are bounded by the best time so far
    from relaxsgd.tune.runner import _bound
    from relaxsgd.tune.study import Plan, load_studies

    plan = Plan.load(out)
    assert _bound(plan, load_studies(plan, out)["localsgd"]) == trial["value"]
