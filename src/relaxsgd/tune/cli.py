"""``relaxsgd tune``: the subcommand's flags, the checks of its input, and its run.

Every bad input is one line and exit 2 before anything is written: an unknown algorithm,
an objective naming a metric the task does not report, a budget that is not positive, a
search space that names an option the algorithm does not have, an output folder that
holds another tune (resume it with ``--resume DIR``) or anything else (``--force``).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

DEFAULT_ALGOS = "localsgd,swarm,olco3,diloco"
LOCK = "tune.lock"


def add_tune_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    t = sub.add_parser(
        "tune", help="search algorithms' settings for a job in the simulator (Optuna)",
        description="Tune algorithms' settings on a job (a --config file, or the flags of "
        "'run' over the default job) in the simulator, with Optuna (TPE, or NSGA-II with "
        "--pareto; successive-halving pruning). Writes the study (study.db), trials.csv, "
        "<algo>/config.yaml of each algorithm's best trial, plots and report.md into --out. "
        "--seed seeds the search (the job's seed: --set seed=N).")
    t.add_argument("--algos", help=f"comma-separated algorithms (default {DEFAULT_ALGOS})")
    t.add_argument("--objective", default="time-to:accuracy=0.96", help="time-to:<metric>="
                   "<target> (virtual time to reach it; default time-to:accuracy=0.96), or "
                   "final[:<metric>] (the metric at the end); metrics: accuracy, loss, bpc")
    t.add_argument("--budget-vtime", type=float, metavar="SECONDS",
                   help="virtual seconds a trial may run (its metric is read there)")
    t.add_argument("--budget-bytes", metavar="BYTES", help="most bytes a worker may send "
                   "(a constraint: e.g. 50MB, 2e7)")
    t.add_argument("--pareto", action="store_true", help="NSGA-II on two objectives, the "
                   "objective and bytes per worker (no pruning)")
    t.add_argument("--no-prune", action="store_true", help="run every trial to its end")
    t.add_argument("--space", metavar="FILE", help="YAML file narrowing or fixing the "
                   "searched keys (README, Tuning)")
    t.add_argument("--trials", type=int, help="trials per algorithm (the first is its "
                   "default configuration; default 20 without --time)")
    t.add_argument("--time", metavar="DURATION", help="wall-time budget of the whole tune: "
                   "30m, 2h, 90s (no trial starts after it; a resumed tune's earlier "
                   "sessions count)")
    t.add_argument("--jobs", type=int, default=1, help="trials run in parallel (processes)")
    t.add_argument("--resume", metavar="DIR", help="continue the tune in DIR (killed or "
                   "stopped; --trials, --time, --jobs may be given again; the time already "
                   "spent counts against --time)")
    common(t)


def parse_duration(text: str | None) -> float | None:
    """``--time``: '30m', '2h', '90s', '1h30m' or a number of seconds."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?:in)?)?\s*"
                     r"(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not m or not any(m.groups()):
        raise ConfigError(f"--time {text!r} is not a duration; give e.g. 30m, 2h or 90s")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    total = 3600 * h + 60 * mi + s
    if total <= 0:
        raise ConfigError(f"--time {text!r} must be more than zero")
    return total


def parse_bytes(text: str | None) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKMGT]i?B|B)?\s*", text)
    units = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 1024,
             "kiB": 1024, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    try:
        value = float(m.group(1)) * units[m.group(2) or "B"] if m else math.nan
    except (ValueError, KeyError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--budget-bytes {text!r} must be a positive size, e.g. 50MB")
    return value


def _budgets(args: argparse.Namespace) -> tuple[int | None, float | None, int]:
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {args.trials}")
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {args.jobs}")
    return args.trials, parse_duration(args.time), args.jobs


def check_folder(out: str, force: bool) -> None:
    """A new tune's folder: never one that holds another tune; else new or empty
    (or --force)."""
    from ..outputs import prepare_out_dir
    from .study import DB_FILE, PLAN_FILE

    if any(os.path.exists(os.path.join(out, f)) for f in (PLAN_FILE, DB_FILE)):
        raise ConfigError(f"{out!r} holds another tune; continue it with 'relaxsgd tune "
                          f"--resume {out}', or give a new --out")
    prepare_out_dir(out, force)


def _take_lock(folder: str) -> str:
    """Refuse a folder another live tune is writing; else mark it ours."""
    path = os.path.join(folder, LOCK)
    try:
        with open(path, encoding="utf-8") as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid and pid != os.getpid():
        try:
            os.kill(pid, 0)
            raise ConfigError(f"a tune (process {pid}) is running in {folder!r}; wait for "
                              "it, or stop it first")
        except ProcessLookupError:
            pass  # killed: its trials are recovered
        except PermissionError:
            raise ConfigError(f"a tune (process {pid}) is running in {folder!r}") from None
    with open(path, "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    return path


def cmd_tune(args: argparse.Namespace) -> int:
    from .plan import new_plan
    from .study import Plan, load_studies, recover_killed

    trials, time_s, jobs = _budgets(args)
    if args.resume:
        given = [f for f in ("algos", "space", "config", "budget_vtime", "budget_bytes")
                 if getattr(args, f) is not None] + (["--set"] if args.set else [])
        if given:
            raise ConfigError(f"--resume keeps the tune's setting; drop {', '.join(given)} "
                              "(only --trials, --time and --jobs may change)")
        folder = args.resume
        plan = Plan.load(folder)
        if trials is not None or time_s is not None:
            plan.trials, plan.time_s = trials, time_s
        _take_lock(folder)
        plan.save(folder)
        n = recover_killed(load_studies(plan, folder))
        if n and not args.quiet:
            print(f"relaxsgd: note: {n} trial(s) were running when the tune stopped; "
                  "they run again", file=sys.stderr)
    else:
        if trials is None and time_s is None:
            trials = 20
        folder, plan = new_plan(args, trials, time_s)
        _take_lock(folder)
        plan.save(folder)
        load_studies(plan, folder, create=True)
    return _run(folder, plan, jobs, args.quiet)


def _run(folder: str, plan: Any, jobs: int, quiet: bool) -> int:
    from .outputs import show, write_all
    from .runner import ProgressLine, work
    from .study import load_studies, record_spent, recover_killed, spent

    studies = load_studies(plan, folder)
    t0, before = time.time(), spent(studies)  # earlier sessions' wall time counts
    deadline = t0 + plan.time_s - before if plan.time_s else None
    if deadline is not None and deadline <= t0 and not quiet:
        print(f"relaxsgd: note: the tune's --time of {plan.time_s:g} s is spent ({before:.0f}"
              " s so far); no trial starts (give a longer --time to go on)", file=sys.stderr)
    bar = ProgressLine(plan, folder, deadline, jobs, quiet)
    bar.update(studies)
    last = [t0]

    def tick() -> None:
        bar.update(studies)
        if time.time() - last[0] >= 5.0:
            last[0] = time.time()
            record_spent(studies, before + last[0] - t0)

    try:
        if jobs == 1:
            work(folder, deadline, on_trial=tick)
        else:
            _run_processes(folder, deadline, jobs, tick)
    except KeyboardInterrupt:
        record_spent(studies, before + time.time() - t0)
        bar.close()
        recover_killed(load_studies(plan, folder))
        write_all(folder, quiet)
        os.remove(os.path.join(folder, LOCK))
        print(f"relaxsgd: tune interrupted; what was measured is in {folder} (continue "
              f"with 'relaxsgd tune --resume {folder}')", file=sys.stderr)
        return 130
    record_spent(studies, before + time.time() - t0)
    bar.update(studies)
    bar.close()
    write_all(folder, quiet)
    os.remove(os.path.join(folder, LOCK))
    print(show(folder))
    print(f"outputs in {folder} (report.md, trials.csv, <algo>/config.yaml, plots)")
    return 0


def _run_processes(folder: str, deadline: float | None, jobs: int,
                   tick: Callable[[], None]) -> None:
    """``jobs`` spawned worker processes sharing the database; progress every 2 s."""
    import multiprocessing

    from .runner import _worker_main

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(folder, deadline, os.getpid(), k))
             for k in range(jobs)]
    for p in procs:
        p.start()
        time.sleep(0.5)  # let each create its connection before the next (SQLite)
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(timeout=2.0 / jobs)
            tick()
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        sys.stderr.write(f"relaxsgd: warning: {len(bad)} tune worker process(es) ended with "
                         f"status {bad}; their running trials run again on --resume\n")


def job_args(args: argparse.Namespace, sets: list[str]) -> argparse.Namespace:
    """``args`` for the job's config_dict: this algorithm's --set items; --seed is the
    search's, not the job's."""
    a = copy.copy(args)
    a.set, a.seed = sets, None
    return a
