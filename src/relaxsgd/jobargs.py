"""The job a command line describes: the config dict from a file (or the default job),
flags and ``--set``; the run's output folder; and what this process has started.

Shared by ``run``, ``compare``, ``calibrate``, ``join`` and ``tune`` (so that
:mod:`relaxsgd.compare` and :mod:`relaxsgd.tune` need not import the CLI that imports
them). Nothing heavy (torch) is imported at module level.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .errors import ConfigError

__all__ = ["CREATED", "DIST_JOB", "STARTED", "config_dict", "drop_empty_created",
           "is_writer", "output_folder"]


def config_dict(args: argparse.Namespace, algo: str | None) -> dict[str, Any]:
    """The raw config dict: the file (or, without one, the default job), flags, --set."""
    from .config import apply_set, check_types, load_yaml
    from .run import algorithm_options, task_options

    if args.steps is not None and args.epochs is not None:
        raise ConfigError("give --steps (local steps per worker) or --epochs (passes over "
                          "the training set), not both")
    d: dict[str, Any] = load_yaml(args.config) if args.config else {}
    _drop_used_out(d, args)
    flags = {"algo": algo, "task": args.task, "workers": args.workers,
             "topology": args.topology, "network": args.network, "steps": args.steps,
             "epochs": args.epochs, "split": args.split, "seed": args.seed,
             "data_dir": args.data_dir, "runtime": args.runtime, "evals": args.evals,
             "out": args.out, "checkpoint_every": args.checkpoint_every,
             "device": args.device}
    for k, v in flags.items():
        if v is not None:
            d[k] = v
    if args.steps is not None:
        d.pop("epochs", None)
    if args.epochs is not None:
        d.pop("steps", None)
    if not args.config:
        from .defaults import algorithm_options as job_options
        from .defaults import fill_defaults

        d = fill_defaults(d)
        d["algo_options"] = {**job_options(d.get("algo") or "localsgd"),
                             **(d.get("algo_options") or {})}
    check_types(d)  # before any name is looked up
    train = d.setdefault("train", {}) or {}
    d["train"] = train
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    if args.lr is not None:
        train["lr"] = args.lr
    if args.step_time is not None:
        d["compute"] = {**(d.get("compute") or {}),
                        "step_time_s": _step_time_flag(args.step_time)}
    if args.compute is not None:
        d["compute"] = {**(d.get("compute") or {}), "profile": args.compute}
        if args.step_time is None:
            # --compute names the device: its step time, not a fixed one from the default
            # job or the config file
            d["compute"].pop("step_time_s", None)
    names = {"algo": algorithm_options(d.get("algo", "localsgd")),
             "task": task_options(d.get("task", "mnist1d"))}
    for item in args.set:
        apply_set(d, item, names)
    return d


def _step_time_flag(text: str) -> float | str:
    """``--step-time``: a number of seconds, or 'measure' (checked by ComputeConfig)."""
    try:
        return float(text)
    except ValueError:
        return text


def _drop_used_out(d: dict[str, Any], args: argparse.Namespace) -> None:
    """A config file's ``out:`` never sends a new run into a folder that holds one (a run's
    own config.yaml fed back, say): without --out/--force it is dropped, with a note."""
    out = d.get("out")
    if out is None or args.out is not None or args.force:
        return
    if isinstance(out, str) and os.path.isdir(out) and os.listdir(out):
        sys.stderr.write(f"relaxsgd: note: the config's out: {out!r} already holds a run; "
                         "writing to a new folder (give --out, or --force to reuse it)\n")
        d.pop("out")


def is_writer() -> bool:
    """True unless this is a worker of rank > 0 of --runtime dist (rank 0 writes)."""
    return os.environ.get("RANK", "0") == "0"


def output_folder(args: argparse.Namespace, cfg: Any) -> str:
    """The run's output folder, checked (and cleaned with --force) before anything runs."""
    from .outputs import prepare_out_dir
    from .run import default_out_dir

    out = cfg.out or default_out_dir(cfg)
    if cfg.runtime == "dist":
        DIST_JOB.append(True)
    if is_writer():
        if not os.path.exists(out):
            CREATED.append(out)
        prepare_out_dir(out, args.force)
        STARTED.append(out)
    return out


CREATED: list[str] = []  # output folders this process made (removed if refused, empty)


def drop_empty_created() -> None:
    """A run refused after its folder was made leaves no folder (if nothing is in it)."""
    import contextlib

    for folder in CREATED:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


STARTED: list[str] = []  # output folders this process has started (for the Ctrl-C line)
DIST_JOB: list[bool] = []  # this process is a worker of a --runtime dist job
