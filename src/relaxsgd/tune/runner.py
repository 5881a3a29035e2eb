"""The trial loop of a tune: in this process (``--jobs 1``) or in ``--jobs`` worker
processes that share the study database, with a progress line on the terminal."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from .params import contains
from .space import apply_params
from .study import COUNTED, Plan, _default_done, counted, load_studies, next_algo, status_of
from .trial import Outcome, run_trial


def run_one(plan: Plan, studies: dict[str, Any], algo: str) -> Outcome:
    """One trial of ``algo``: its default configuration first (unpruned), then the
    sampler's proposals; the outcome is told to the study."""
    study = studies[algo]
    if not _default_done(study) and not study.user_attrs.get("default_claim"):
        study.set_user_attr("default_claim", str(os.getpid()))
        return _run_default(plan, study, algo)
    from optuna.trial import TrialState

    obj = plan.obj()
    trial = study.ask()
    params = plan.space(algo).suggest(trial)

    def prune(step: int, value: float) -> bool:
        if plan.pareto or not math.isfinite(value):
            return False
        trial.report(value, step)
        return trial.should_prune()

    out = run_trial(apply_params(plan.jobs[algo], params), obj, prune, _bound(plan, study))
    _attrs(trial.set_user_attr, out, obj)
    if out.status == "pruned":
        study.tell(trial, state=TrialState.PRUNED)
    elif out.value is None or not math.isfinite(out.value):
        if out.status in ("complete", "over_budget"):
            trial.set_user_attr("status", "failed")
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, _values(plan, out))
    return out


def _bound(plan: Plan, study: Any) -> float | None:
    """The best time to the target ``study`` has measured (a time-to trial past it cannot
    be the best); None for other objectives, and on a Pareto front (a slower trial may
    still send fewer bytes)."""
    from .outputs import best_trial

    obj = plan.obj()
    if obj.kind != "time-to" or plan.pareto:
        return None
    best = best_trial(study, obj)
    return float(best.user_attrs["value"]) if best and best.user_attrs.get("reached") else None


def _run_default(plan: Plan, study: Any, algo: str) -> Outcome:
    """The job's own configuration of ``algo``, recorded as a trial with the params that
    lie in the space (the others are the job's too)."""
    import optuna
    from optuna.trial import TrialState

    obj = plan.obj()
    out = run_trial(plan.jobs[algo], obj, None)
    space = plan.space(algo)
    dists = _distributions(space)
    params = {k: v for k, v in plan.defaults[algo].items()
              if k in dists and contains(space.params[k], v)}
    attrs: dict[str, Any] = {"default": True}
    _attrs(attrs.__setitem__, out, obj)
    ok = out.value is not None and math.isfinite(out.value) and out.status != "pruned"
    if not ok and out.status in ("complete", "over_budget"):
        attrs["status"] = "failed"
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.COMPLETE if ok else TrialState.FAIL,
        values=_values(plan, out) if ok else None, params=params,
        distributions={k: dists[k] for k in params}, user_attrs=attrs))
    return out


def _distributions(space: Any) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from .params import Float, Int

    out: dict[str, Any] = {}
    for k, p in space.params.items():
        if isinstance(p, Float):
            out[k] = FloatDistribution(p.low, p.high, log=p.log)
        elif isinstance(p, Int):
            out[k] = IntDistribution(p.low, p.high, log=p.log)
        else:
            out[k] = CategoricalDistribution(list(p.choices))
    return out


def _values(plan: Plan, out: Outcome) -> list[float]:
    if plan.pareto:
        return [float(out.value), float(out.bytes_per_worker or 0.0)]  # type: ignore[arg-type]
    return [float(out.value)]  # type: ignore[arg-type]


def _attrs(set_attr: Callable[[str, Any], None], out: Outcome, obj: Any) -> None:
    for k, v in out.attrs().items():
        set_attr(k, v)
    over = 0.0
    if obj.budget_bytes is not None and out.bytes_per_worker is not None:
        over = out.bytes_per_worker / obj.budget_bytes - 1.0
    if obj.budget_bytes is not None and out.status == "over_budget":
        over = max(over, 1e-9)
    set_attr("constraint", over)


def work(folder: str, deadline: float | None, on_trial: Callable[[], None] | None = None,
         parent: int | None = None, worker: int = 0) -> None:
    """Run trials until every algorithm has its --trials, the deadline passes, or (in a
    worker process) the parent tune is gone."""
    import torch

    torch.set_num_threads(1)
    plan = Plan.load(folder)
    studies = load_studies(plan, folder, worker=worker)
    while deadline is None or time.time() < deadline:
        if parent is not None and os.getppid() != parent:
            return  # the tune that started us was killed: leave the rest to --resume
        algo = next_algo(plan, studies)
        if algo is None:
            return
        run_one(plan, studies, algo)
        if on_trial is not None:
            on_trial()


def _worker_main(folder: str, deadline: float | None, parent: int, worker: int) -> None:
    """A --jobs worker process (spawned)."""
    try:
        work(folder, deadline, parent=parent, worker=worker)
    except KeyboardInterrupt:
        pass


class ProgressLine:
    """``tune: 7/32 trials (2 pruned, 1 refused) | best localsgd 45.1 | 3m elapsed, ~9m
    left`` on stderr, rewritten in place on a terminal."""

    def __init__(self, plan: Plan, folder: str, deadline: float | None, jobs: int,
                 quiet: bool) -> None:
        self.plan, self.folder, self.deadline, self.jobs = plan, folder, deadline, jobs
        self.quiet, self.t0, self.last = quiet, time.time(), ""
        self.tty = sys.stderr.isatty()

    def update(self, studies: dict[str, Any]) -> None:
        if self.quiet:
            return
        trials = [t for s in studies.values() for t in counted(s)]
        st = [status_of(t) for t in trials]
        parts = [f"{st.count(k)} {k}" for k in COUNTED[1:] if st.count(k)]
        total = f"/{self.plan.trials * len(self.plan.algos)}" if self.plan.trials else ""
        line = f"tune: {len(trials)}{total} trials" + (f" ({', '.join(parts)})" if parts else "")
        best = self._best(studies)
        if best:
            line += f" | best {best}"
        news = line  # not on a terminal (a log): a line when a trial ends, not every tick
        line += f" | {_dur(time.time() - self.t0)} elapsed{self._left(trials)}"
        if (line if self.tty else news) != self.last:
            sys.stderr.write(("\r\033[K" if self.tty else "") + line + ("" if self.tty else "\n"))
            sys.stderr.flush()
            self.last = line if self.tty else news

    def close(self) -> None:
        if not self.quiet and self.tty and self.last:
            sys.stderr.write("\n")

    def _best(self, studies: dict[str, Any]) -> str:
        from .outputs import best_trial

        obj = self.plan.obj()
        out = []
        for algo, s in studies.items():
            t = best_trial(s, obj)
            if t is not None:
                out.append(f"{algo} {t.user_attrs['value']:.4g}")
        return ", ".join(out)

    def _left(self, trials: list[Any]) -> str:
        if self.deadline is not None:
            return f", {_dur(max(0.0, self.deadline - time.time()))} left"
        if not self.plan.trials or not trials:
            return ""
        todo = self.plan.trials * len(self.plan.algos) - len(trials)
        mean = sum(float(t.user_attrs.get("wall_s", 0.0)) for t in trials) / len(trials)
        return f", ~{_dur(todo * mean / self.jobs)} left"


def _dur(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else \
        f"{s // 60}m{s % 60:02d}s"
