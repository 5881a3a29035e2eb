"""The start-up of one dist worker before the workers meet: checks, data, model, output
folder, the checkpoint to resume from. (Split from :mod:`.runtime`.)"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..config import RunConfig
from ..errors import ConfigError
from . import elastic_saving, saving
from .elastic import is_elastic
from .options import DistOptions
from .process import local_world_size, pick_backend
from .scripted import trace_events


def start(cfg: RunConfig, env: Any, opts: DistOptions, store: Any, write: bool,
           resume: bool) -> tuple[Any, ...]:
    """The part of the start-up before the workers meet: checks, data, model, folder."""
    from ..run import prepare

    world = env.world
    if world != cfg.workers and resume:
        raise ConfigError(f"the run in {cfg.out!r} has {cfg.workers} workers and this job "
                          f"{world} processes; resume it with torchrun --nproc-per-node "
                          f"{cfg.workers} (one process per worker, as it was run)")
    if world != cfg.workers:
        raise ConfigError(f"the config has workers={cfg.workers} but the job has {world} "
                          f"processes; launch {cfg.workers} or pass --workers {world}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    clock = {"entered": time.perf_counter()}
    prep = prepare(cfg)  # config errors end every rank before any connection
    trace_events(cfg)  # (a trace the dist runtime cannot play, too: .scripted)
    clock["prepared"] = time.perf_counter()
    backend, device = pick_backend(opts, env.local_rank, getattr(cfg, "device", None),
                                   local_world_size(world))
    out = out_dir(store, cfg, env.rank, write, resume, prep.algo.resumable)
    if resume and is_elastic(cfg):  # every worker resumes from rank 0's file
        ck: Any = elastic_saving.load(out, resolved(prep), world)
    else:
        ck = saving.load_for_resume(store, out, env.rank, world, resolved(prep),
                                    saving.synchronous(prep.algo)) if resume else None
    return prep, backend, device, out, ck, clock


def resolved(prep: Any) -> dict[str, Any]:
    return {**prep.resolved, "runtime": "dist"}


def out_dir(store: Any, cfg: RunConfig, rank: int, write: bool, resume: bool,
             resumable: bool) -> str | None:
    """The run's folder: rank 0's choice; the others learn it when they save checkpoints
    there (an algorithm that follows the checkpoint rule, a run that writes)."""
    from ..run import default_out_dir

    if resume:
        return cfg.out
    if not write:
        return None
    if rank == 0:
        out = cfg.out or default_out_dir(cfg)
        if resumable:
            store.set("out", out)
        return out
    return store.get("out").decode() if resumable else None
