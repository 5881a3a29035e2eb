"""The Optuna side of a tune: one study per algorithm in ``<out>/study.db`` (SQLite), the
loop that runs trials (in this process, or in ``--jobs`` processes sharing the database),
the default configuration's reference trial, and resuming after a kill.

A tune's plan (:class:`Plan`, ``tune.json``) holds everything a resumed tune needs: the
algorithms, each algorithm's job (config dict) and space, the objective and the budgets.
Budgets: ``trials`` per algorithm (the first trial of each is the algorithm's default
configuration in the job, run unpruned, so that the tuned best is measured against it);
``time_s`` of wall time over the whole tune (no trial starts after it; running ones
finish), the sessions of a resumed tune together: the wall time spent so far is recorded
in the study (:func:`spent`; a killed session's is as of its last record, after each
trial and every few seconds with ``--jobs``), and a resumed tune has what is left.
Algorithms take turns (the one with the fewest trials goes next), so a time budget is
shared evenly.

Samplers: TPE (seeded; ``constraints_func`` for the byte budget), or NSGA-II with two
objectives (the objective and bytes per worker) when a Pareto front is asked for. Pruner:
successive halving on the evaluations, its first rung a quarter of the way through the
job (:func:`halving`; single objective only; Optuna cannot prune a multi-objective study).

Resume: trials that were running when the tune was killed are marked failed with status
``killed`` and their settings queued again, so every finished trial is kept and the tune
ends with as many finished trials as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import ConfigError
from .objective import Objective
from .params import Choice, Float, Int, Param
from .space import Space

PLAN_FILE = "tune.json"
DB_FILE = "study.db"
COUNTED = ("complete", "pruned", "over_budget", "refused", "diverged", "failed")


@dataclass
class Plan:
    """A tune's whole setting (``tune.json``)."""

    algos: list[str]
    jobs: dict[str, dict[str, Any]]  # algorithm -> raw config dict of its trials
    spaces: dict[str, dict[str, dict[str, Any]]]  # algorithm -> key -> plain declaration
    defaults: dict[str, dict[str, Any]]  # algorithm -> the job's own values of the keys
    objective: dict[str, Any]
    pareto: bool = False
    prune: bool = True
    trials: int | None = None
    time_s: float | None = None
    seed: int = 0

    def save(self, folder: str) -> None:
        from ..outputs import write_json

        write_json(os.path.join(folder, PLAN_FILE), asdict(self))

    @classmethod
    def load(cls, folder: str) -> Plan:
        path = os.path.join(folder, PLAN_FILE)
        if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, DB_FILE)):
            raise ConfigError(f"{folder!r} is not a tune folder (no {PLAN_FILE} and "
                              f"{DB_FILE}); give a folder written by 'relaxsgd tune'")
        try:
            with open(path, encoding="utf-8") as f:
                return cls(**json.load(f))
        except (ValueError, TypeError, UnicodeDecodeError):
            raise ConfigError(f"{path!r} is damaged or not a relaxsgd tune plan") from None

    def obj(self) -> Objective:
        return Objective(**self.objective)

    def space(self, algo: str) -> Space:
        kinds = {"float": Float, "int": Int, "choice": Choice}
        params: dict[str, Param] = {}
        for key, d in self.spaces[algo].items():
            d = dict(d)
            kind = kinds[d.pop("kind")]
            if kind is Choice:
                d["choices"] = tuple(d["choices"])
            params[key] = kind(**d)
        return Space(algo, params)


def storage_url(folder: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(folder, DB_FILE))


def open_storage(folder: str) -> Any:
    import optuna

    # several processes write one SQLite file: wait for its lock rather than fail
    return optuna.storages.RDBStorage(
        storage_url(folder), engine_kwargs={"connect_args": {"timeout": 120}})


def load_studies(plan: Plan, folder: str, create: bool = False, worker: int = 0
                 ) -> dict[str, Any]:
    """The algorithms' studies, with their samplers and pruner (created when asked).
    ``worker``: the --jobs process's index, so that parallel samplers draw differently."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # constraints_func is the samplers' documented way in optuna 3.x; 5.x prefers
    # Trial.set_constraint and says so once per trial
    warnings.filterwarnings("ignore", message=".*set_constraint.*", category=FutureWarning)
    storage = open_storage(folder)
    obj = plan.obj()
    out = {}
    for i, algo in enumerate(plan.algos):
        seed = plan.seed * 1000 + i + 100 * worker
        if not create:  # a resumed study: a fresh stream, not the first session's again
            try:
                seed += 7919 * len(optuna.load_study(study_name=algo, storage=storage)
                                   .get_trials(deepcopy=False))
            except KeyError:
                pass
        constraints = _constraint if obj.budget_bytes is not None else None
        if plan.pareto:
            sampler: Any = optuna.samplers.NSGAIISampler(
                seed=seed, constraints_func=constraints,
                population_size=max(4, min(20, (plan.trials or 40) // 3)))
            directions = [obj.direction, "minimize"]
        else:
            startup = max(3, min(10, (plan.trials or 30) // 3))
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup,
                                                 constraints_func=constraints)
            directions = [obj.direction]
        pruner = (halving(int(plan.jobs[algo].get("evals") or 15))
                  if plan.prune and not plan.pareto else optuna.pruners.NopPruner())
        kw = dict(study_name=algo, storage=storage, sampler=sampler, pruner=pruner)
        if create:
            out[algo] = optuna.create_study(directions=directions, **kw)
        else:
            out[algo] = optuna.load_study(**kw)
    return out


def halving(evals: int) -> Any:
    """Successive halving whose first rung is a quarter of the way through the job (its
    ``evals`` evaluations), then 3x further: early evaluations say little about the time
    to a target (a fixed first rung at the 2nd evaluation pruned, with 20 evaluations,
    the trials that went on to win; with more evaluations it came ever sooner)."""
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(2, evals // 4),
                                                  reduction_factor=3)


SPENT = "wall_spent_s"  # user attribute of the first algorithm's study


def spent(studies: dict[str, Any]) -> float:
    """Wall seconds the tune's sessions have spent so far (as last recorded)."""
    first = next(iter(studies.values()))
    return float(first.user_attrs.get(SPENT, 0.0))


def record_spent(studies: dict[str, Any], seconds: float) -> None:
    next(iter(studies.values())).set_user_attr(SPENT, float(seconds))


def _constraint(trial: Any) -> list[float]:
    """Optuna's constraints_func: > 0 means infeasible (over the byte budget)."""
    return [float(trial.user_attrs.get("constraint", 0.0))]


def status_of(t: Any) -> str:
    return str(t.user_attrs.get("status", t.state.name.lower()))


def counted(study: Any) -> list[Any]:
    """The finished trials that count towards --trials (not those killed)."""
    return [t for t in study.get_trials(deepcopy=False) if status_of(t) in COUNTED]


def recover_killed(studies: dict[str, Any]) -> int:
    """Mark trials left running by a killed tune as failed ("killed") and queue their
    settings again; returns how many there were."""
    from optuna.trial import TrialState

    n = 0
    for study in studies.values():
        storage = study._storage
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            storage.set_trial_user_attr(t._trial_id, "status", "killed")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            if not t.user_attrs.get("default") and t.params:
                study.enqueue_trial(dict(t.params))
            n += 1
        if study.user_attrs.get("default_claim") and not _default_done(study):
            study.set_user_attr("default_claim", "")
    return n


def _default_done(study: Any) -> bool:
    return any(t.user_attrs.get("default") and status_of(t) in COUNTED
               for t in study.get_trials(deepcopy=False))


def next_algo(plan: Plan, studies: dict[str, Any]) -> str | None:
    """The algorithm whose turn it is (fewest trials, finished or running, a running
    default included), or None when every algorithm has its --trials."""
    from optuna.trial import TrialState

    best, fewest = None, math.inf
    for algo in plan.algos:
        study = studies[algo]
        trials = study.get_trials(deepcopy=False)
        k = sum(1 for t in trials if status_of(t) in COUNTED or t.state == TrialState.RUNNING)
        if study.user_attrs.get("default_claim") and not _default_done(study):
            k += 1  # its default is running (recorded only when it ends)
        if plan.trials is not None and k >= plan.trials:
            continue
        if k < fewest:
            best, fewest = algo, k
    return best
