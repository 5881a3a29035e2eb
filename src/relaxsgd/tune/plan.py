"""A new tune's :class:`~relaxsgd.tune.study.Plan` from the command line: each algorithm's
job (as ``relaxsgd compare`` builds it: the default job or --config, the flags, shared
and per-algorithm ``--set``), its checked search space, and the objective checked
against the task. Everything is checked before the folder is touched."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..errors import ConfigError
from .objective import parse_objective
from .space import apply_params, as_plain, build_space, current_values, load_space_file
from .study import Plan


def _fixed_keys(items: list[str], algo: str, lr_flag: bool) -> set[str]:
    """The searched keys a --set (or --lr) fixes, as dotted keys."""
    from dataclasses import fields

    from ..algorithms import ALGORITHMS
    from ..training import TrainConfig

    algo_names = {f.name for f in fields(ALGORITHMS.get(algo).Config)}
    train_names = {f.name for f in fields(TrainConfig)}
    out = {"train.lr"} if lr_flag else set()
    for item in items:
        key = item.partition("=")[0].strip()
        if key.startswith(("algo.", "train.")):
            out.add(key)
            if key == "train.betas":
                out |= {"train.beta1", "train.beta2"}
        elif key in algo_names:
            out.add(f"algo.{key}")
        elif key in train_names:
            out.add(f"train.{key}")
    return out


def _job(args: argparse.Namespace, algo: str, sets: list[str]) -> dict[str, Any]:
    from ..jobargs import config_dict
    from .cli import job_args

    d = config_dict(job_args(args, sets), algo)
    d.pop("out", None)
    d.pop("checkpoint_every", None)
    if (d.get("runtime") or "sim") != "sim":
        raise ConfigError("relaxsgd tune runs its trials in the simulator; drop --runtime "
                          "dist (a tuned config.yaml runs under --runtime dist unchanged)")
    if (d.get("compute") or {}).get("step_time_s") == "measure":
        raise ConfigError("--step-time measure makes trials depend on this machine's load; "
                          "give a step time in seconds or a --compute profile")
    return d


def new_plan(args: argparse.Namespace, trials: int | None, time_s: float | None
             ) -> tuple[str, Plan]:
    """The checked plan and the prepared output folder of a new tune."""
    from ..compare import _per_algorithm_sets, parse_algos
    from ..config import _typed, from_dict
    from ..run import prepare
    from .cli import DEFAULT_ALGOS, check_folder, parse_bytes

    algos = parse_algos(args.algos or DEFAULT_ALGOS)
    objective = parse_objective(args.objective, args.budget_vtime,
                                parse_bytes(args.budget_bytes))
    shared, per = _per_algorithm_sets(list(args.set), algos)
    specs = load_space_file(args.space, algos) if args.space else {a: {} for a in algos}
    jobs, spaces, defaults = {}, {}, {}
    for i, algo in enumerate(algos):
        sets = shared + per[algo]
        d = _job(args, algo, sets)
        cfg = from_dict({**d, "out": None})
        algo_cfg = _typed(_algo_cls(algo).Config, cfg.algo_options, f"algorithm {algo!r}")
        if i == 0:  # the task, data and objective are shared: check them once
            objective = objective.for_task(prepare(cfg).spec, cfg.task)
        space, fixed_values = build_space(algo, cfg.train,
                                          _fixed_keys(sets, algo, args.lr is not None),
                                          specs[algo])
        d = apply_params(d, fixed_values)
        cfg = from_dict({**d, "out": None})
        algo_cfg = _typed(_algo_cls(algo).Config, cfg.algo_options, f"algorithm {algo!r}")
        jobs[algo] = d
        spaces[algo] = {k: as_plain(p) for k, p in space.params.items()}
        defaults[algo] = current_values(cfg, algo_cfg, list(space.params))
    out = args.out or _default_out(jobs[algos[0]])
    check_folder(out, args.force)
    plan = Plan(algos=algos, jobs=jobs, spaces=spaces, defaults=defaults,
                objective=dataclasses.asdict(objective), pareto=args.pareto,
                prune=not args.no_prune, trials=trials, time_s=time_s,
                seed=args.seed if args.seed is not None else 0)
    return out, plan


def _algo_cls(algo: str) -> Any:
    from ..algorithms import ALGORITHMS

    return ALGORITHMS.get(algo)


def _default_out(job: dict[str, Any]) -> str:
    from ..outputs import new_run_folder

    return new_run_folder(f"tune-{job.get('task')}-n{job.get('workers')}")
