"""One run, end to end: resolve the config, build the task and algorithm, run it, write it.

:func:`prepare` turns a :class:`RunConfig` into the pieces both runtimes need;
:func:`run` drives the simulator (``runtime: sim``) or hands over to the distributed
runtime, and writes the output folder: ``config.yaml``, ``metrics.csv`` (written row by
row, so nothing measured is lost on Ctrl-C or divergence), ``result.json`` and plots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from .algorithms import ALGORITHMS
from .algorithms.base import Algorithm, RunInfo
from .bank import check_fits
from .config import RunConfig, _typed, dump_yaml
from .errors import ConfigError
from .outputs import discard_refused, new_run_folder, shield_interrupts, write_json
from .results import (  # noqa: F401  (re-exported: the dist runtime imports them from here)
    INTERRUPTED,
    INTERRUPTED_FINAL,
    DivergedAfterWrite,
    make_result,
    result_header,
    write_result,
)
from .runlock import RunLock
from .sim.compute import load_profile
from .sim.network import make_network_config
from .simulation import SimOutcome, Simulation, measure_step_time  # noqa: F401
from .tasks import TASKS
from .tasks.base import TaskSpec


@dataclass
class Prepared:
    cfg: RunConfig
    spec: TaskSpec
    shards: list[torch.Tensor]
    total_steps: int
    algo: Algorithm
    info: RunInfo
    resolved: dict[str, Any]


def algorithm_options(name: str) -> list[str]:
    return [f.name for f in fields(ALGORITHMS.get(name).Config)]


def task_options(name: str) -> list[str]:
    return list(getattr(TASKS.module(name), "OPTIONS", {}))


def build_topology(cfg: RunConfig) -> Any:
    from .topology import make_topology

    # over every worker id (elastic.max_workers): a joiner has its place in the graph
    return make_topology(cfg.topology, cfg.elastic.ids(cfg.workers), seed=cfg.seed,
                         **cfg.topology_options)


def prepare(cfg: RunConfig) -> Prepared:
    """Resolve everything a run needs; every bad name or value is a ConfigError here."""
    algo_cls = ALGORITHMS.get(cfg.algo)
    algo_cfg = _typed(algo_cls.Config, cfg.algo_options, f"algorithm {cfg.algo!r}")
    make_network_config(cfg.network, **cfg.network_options)  # validate early
    load_profile(cfg.compute.profile)  # a bad --compute is an error even with a step time
    spec: TaskSpec = TASKS.get(cfg.task)(dict(cfg.task_options), cfg.data_dir, cfg.seed)
    from .tasks.splits import split_indices

    check_fits(spec, cfg.workers)
    n_train = spec.data.x_train.shape[0]
    if cfg.workers > n_train:
        raise ConfigError(f"{cfg.workers} workers but only {n_train} training samples; "
                          "use fewer workers")
    if cfg.split == "play" and spec.groups is None:
        raise ConfigError(f"split 'play' deals whole works and task {cfg.task!r} has none; "
                          "use it with task shakespeare, or split iid, shards or dirichlet")
    labels = spec.groups if spec.groups is not None else spec.data.y_train
    # one shard per worker id (elastic.max_workers, default workers): worker i always
    # trains on shard i, so a rejoined worker keeps its data and a joiner brings new data
    ids = cfg.elastic.ids(cfg.workers)
    shards = split_indices(labels, ids, cfg.split, cfg.seed, **cfg.split_options)
    share = n_train // ids  # the mean shard (non-iid splits vary around it)
    if cfg.train.batch_size > share:  # each batch would wrap around the shard
        raise ConfigError(f"batch size {cfg.train.batch_size} is larger than a worker's share "
                          f"of the training set ({n_train} samples over {cfg.workers} workers"
                          f" = {share}); use --batch-size {share} or less, or fewer workers")
    if cfg.steps is not None:
        total = cfg.steps
    else:
        epochs = cfg.epochs if cfg.epochs is not None else 1.0
        total = max(1, math.ceil(epochs * n_train / (cfg.workers * cfg.train.batch_size)))
    # Only algorithms that talk over a graph build one: all-reduce algorithms ignore
    # --topology, as documented, rather than reject a graph they would not use; but a
    # name that is no topology is a typo, refused for every algorithm.
    from .topology import check_topology

    check_topology(cfg.topology, cfg.topology_options)
    topo = build_topology(cfg) if algo_cls.needs_topology else None
    info = RunInfo(n=cfg.workers, seed=cfg.seed, topology=topo, dim=0)
    if ids > cfg.workers:
        info.extra["max_workers"] = ids
    if cfg.elastic.churn.trace is not None:  # known in advance (SwarmSGD sequential)
        from .elastic_config import read_trace

        info.extra["trace"] = read_trace(cfg.elastic.churn.trace, cfg.workers, ids)
        info.extra["random_churn"] = cfg.elastic.churn.mtbf_s is not None or \
            cfg.elastic.churn.joins > 0
    algo = algo_cls(algo_cfg, info)
    resolved = cfg.to_dict()
    resolved["algo_options"] = dataclasses.asdict(algo_cfg)
    resolved["steps_per_worker"] = total  # for the reader; ignored when read back
    resolved.pop("out", None)  # where the run was written is not part of the run
    return Prepared(cfg, spec, shards, total, algo, info, resolved)


def default_out_dir(cfg: RunConfig) -> str:
    return new_run_folder(f"{cfg.algo}-{cfg.task}-n{cfg.workers}")


def run(cfg: RunConfig, progress: bool = True, write: bool = True,
        resume: bool = False) -> dict[str, Any]:
    """Run one configuration; returns the result dict (also written as result.json).

    ``resume``: continue the run in ``cfg.out`` from its checkpoint (``relaxsgd resume``).
    The run folder's lock (:mod:`.runlock`) is held from before the first file is written
    to the end; a new run refused before its first evaluation (a ConfigError) leaves no
    file behind (:func:`~relaxsgd.outputs.discard_refused`)."""
    refused: list[str] = []
    try:
        with contextlib.ExitStack() as held:
            if cfg.runtime == "dist":
                from .distributed.runtime import run_dist  # type: ignore[import-not-found]

                if write and cfg.out and os.path.isdir(cfg.out) and \
                        os.environ.get("RANK", "0") == "0":  # rank 0 writes, and locks
                    held.enter_context(RunLock(cfg.out))
                return run_dist(cfg, progress=progress, write=write, resume=resume)
            prep = prepare(cfg)
            out = None
            ck = None
            if resume:
                from . import checkpoint

                out = cfg.out
                held.enter_context(RunLock(out))
                ck = checkpoint.load(os.path.join(out, checkpoint.FILE), "sim", prep.resolved)
            elif write:
                out = cfg.out or default_out_dir(cfg)
                os.makedirs(out, exist_ok=True)
                held.enter_context(RunLock(out))
                dump_yaml(prep.resolved, os.path.join(out, "config.yaml"))
            try:
                return simulate(prep, out, progress, resume=ck).result
            except KeyboardInterrupt:
                if out and not os.path.exists(os.path.join(out, "result.json")):
                    with shield_interrupts():  # Ctrl-C before the first step: say so, in JSON
                        write_json(os.path.join(out, "result.json"), {
                            **result_header(cfg), "status": "interrupted", "final": None,
                            "message": "interrupted during start-up, before the first local "
                                       "step"})
                raise
            except ConfigError:
                if out and not resume:  # refused before anything was measured: no litter
                    refused.append(out)
                raise
    finally:
        for folder in refused:  # once the lock file is gone, so the folder can go too
            discard_refused(folder)


def run_sim(prep: Prepared, out: str | None, progress: bool = True) -> dict[str, Any]:
    return simulate(prep, out, progress).result


def simulate(prep: Prepared, out: str | None = None, progress: bool = False,
             resume: dict[str, Any] | None = None,
             on_eval: Callable[[dict[str, Any]], None] | None = None) -> SimOutcome:
    """Run ``prep`` in the simulator; a diverged or interrupted run raises after writing.

    ``resume``: a checkpoint (:func:`relaxsgd.checkpoint.load`) to continue from.
    ``on_eval``: called with every evaluation's row as it is recorded (``relaxsgd tune``
    prunes and stops trials from it; an exception it raises ends the run unwritten)."""
    return Simulation(prep, out, progress, resume, on_eval=on_eval).run()
