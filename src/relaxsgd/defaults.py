"""The default job: what ``relaxsgd run`` and ``relaxsgd compare`` train when no
``--config`` is given and the flags leave a setting open.

One recipe for both commands, so that ``relaxsgd run --algo X`` reproduces the row of X in
``relaxsgd compare``. The setting: 16 workers over a WAN (``wan`` profile: 40 ms, 100
Mbit/s per link), each local step taking 50 ms of virtual time (a mid-size model on a GPU,
so that compute and communication are of one order and the run's virtual times do not
depend on the machine), iid split, 15 evaluations. The task's own recipe (model, length,
learning rate) comes from :data:`RECIPES`: MNIST-1D (the default task, generated) with its
1-D CNN on 10,000 samples for 30 epochs at lr 0.1 with momentum 0.9 reaches 0.97 with
Local SGD, where the task's bare defaults (the MLP, 4,000 samples, 1 epoch, no momentum)
reach 0.18. Per-algorithm options are the algorithms' own defaults (each module's Config
states why), except where :data:`ALGORITHM_OPTIONS` says otherwise.

A config file replaces all of this: its values and the dataclass defaults are the run.
"""

from __future__ import annotations

import copy
from typing import Any

# The setting shared by every task (the simulator's part does not apply to --runtime dist).
# The workers' own models are evaluated on a fixed 256-sample subsample of the test set
# (the mean model on all of it): evaluating 16 models on the whole set took about a third
# of the default job's wall time, and at 512 samples SwarmSGD's 16 distinct models still
# took 20% of its wall time (issue 17's goal: 15%; 13% at 256). The workers' mean over 16
# models on 256 samples has a standard error of about 0.01 near 75% accuracy.
SETTING: dict[str, Any] = {"workers": 16, "split": "iid", "evals": 15,
                           "eval_worker_samples": 256}
SIM_SETTING: dict[str, Any] = {"network": "wan", "compute": {"step_time_s": 0.05}}

# What each task deserves: enough model and epochs to learn it (accuracies measured with
# Local SGD in the default setting are in the README's Running section).
RECIPES: dict[str, dict[str, Any]] = {
    "mnist1d": {"task_options": {"model": "cnn", "num_samples": 10000}, "epochs": 30,
                "train": {"lr": 0.1, "momentum": 0.9}},
    "mnist": {"epochs": 2},
    "digits": {"epochs": 30, "train": {"lr": 0.1, "momentum": 0.9}},
    "logreg": {"epochs": 10},
    "quadratic": {"epochs": 10},
    "cifar10": {"epochs": 30},
}

# Derived by relaxsgd tune on this job (README, "Tuning the default job"): time to 0.96
# test accuracy, 20 evaluations, lr 0.1 and momentum 0.9 kept, 26 minutes of wall time.
# Local SGD p=48 reached 0.96 in 41.3 virtual s (p=8, the former default: 108.9 s; its
# module default p = 4 suits the small settings its tests use; it ends at 0.9665 against
# p=8's 0.971, 3.5x sooner); DiLoCo p=32, outer lr 0.977, outer momentum 0.281 in 38.1 s
# (34.1 s with the trial's unrounded values; the module defaults p=8, 0.7, 0.9: 117.5 s).
# SwarmSGD keeps its module defaults (a 47-minute tune of SwarmSGD and OLCO3,
# benchmarks/tune_default_job.py, found no faster SwarmSGD than its 30.5 s). OLCO3 sends
# top-k 10% both ways through its parameter server (p = 4, s = 1, the module's other
# defaults): from that tune, 0.96 in 21.7 virtual s, 0.963 at the job's end (23.9 s);
# top-k 5%, the former default chosen by hand with the server's real costs, ends at 0.959
# (23.7 s) with half the bytes and never reaches 0.96; top-k 1%, the module default,
# 0.947 with 10x fewer bytes (benchmarks/default_job.py, the README's table).
ALGORITHM_OPTIONS: dict[str, dict[str, Any]] = {
    "localsgd": {"p": 48},
    "diloco": {"p": 32, "outer_lr": 0.977, "outer_momentum": 0.281},
    "olco3": {"compressor": "topk:ratio=0.1"},
}


# Training options of the default job that differ per algorithm (task -> algorithm ->
# train section, over the task's recipe; --lr and --set train.* still win). OLCO3's lr
# comes from the second tune of issue 19 (README "Tuning the default job"): its best
# trial, lr 0.1648, reached 0.96 at 17.7 virtual s, and lr 0.165 at 18.1 s against 20.9 s
# at the recipe's 0.1 (60 evaluations), 0.968 at the job's end against 0.963, with the
# same bytes.
ALGORITHM_TRAIN: dict[str, dict[str, dict[str, Any]]] = {
    "mnist1d": {"olco3": {"lr": 0.165}},
}


def algorithm_train(task: str, algo: str) -> dict[str, Any]:
    """The default job's training options for ``algo`` on ``task`` over the recipe's."""
    return dict(ALGORITHM_TRAIN.get(task, {}).get(algo, {}))


def default_job(task: str, runtime: str | None) -> dict[str, Any]:
    """The default job's config dict for ``task`` (unknown tasks get the setting only)."""
    job = {**copy.deepcopy(SETTING), "task": task}
    if runtime in (None, "sim"):
        job.update(copy.deepcopy(SIM_SETTING))
    job.update(copy.deepcopy(RECIPES.get(task, {})))
    return job


def fill_defaults(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (a config dict from the flags) with the default job under what it leaves open.

    Sections (``train``, ``compute``, ``task_options``) merge key by key (the algorithm's
    own training options, :data:`ALGORITHM_TRAIN`, over the recipe's, the user's over
    both); ``steps`` or ``epochs`` given by the user replaces the recipe's run length.
    """
    task = d.get("task") or "mnist1d"
    job = default_job(task, d.get("runtime"))
    own = algorithm_train(task, d.get("algo") or "localsgd")
    if own:
        job["train"] = {**job.get("train", {}), **own}
    if d.get("steps") is not None or d.get("epochs") is not None:
        job.pop("epochs", None)
    out = dict(d)
    for k, v in job.items():
        if isinstance(v, dict):
            out[k] = {**v, **(out.get(k) or {})}
        elif out.get(k) is None:
            out[k] = v
    return out


def algorithm_options(algo: str) -> dict[str, Any]:
    """The default job's options for ``algo`` (over the algorithm's dataclass defaults)."""
    return dict(ALGORITHM_OPTIONS.get(algo, {}))
