"""Run configuration: YAML in, flags and ``--set key=value`` over it, resolved YAML out.

A config file has the shape of the resolved ``config.yaml`` a run writes::

    algo: localsgd
    algo_options: {p: 8}
    task: mnist1d
    task_options: {model: mlp}
    workers: 16
    split: dirichlet
    split_options: {alpha: 0.5}
    network: wan                 # datacenter | cloud | wan | mobile | custom
    network_options: {}          # latency_s, bandwidth_Bps, jitter, loss
    topology: complete
    topology_options: {}
    train: {batch_size: 32, lr: 0.05, momentum: 0.9}  # over the task's TRAIN_DEFAULTS
    compute: {step_time_s: null} # null: measured on this machine
    epochs: 5                    # or steps: local steps per worker
    evals: 20
    seed: 0

``--set`` keys are dotted (``algo.p=8``, ``task.model=cnn``, ``split.alpha=0.1``,
``train.momentum=0.9``, ``compute.step_time_s=0.01``, ``network.latency_s=0.1``) or bare
(``p=8``: looked up in the algorithm's options, then the task's, then ``train``, then
the top level). Values are parsed as YAML (numbers, booleans, lists).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .errors import ConfigError
from .sim.compute import ComputeConfig
from .training import TrainConfig

RUNTIMES = ("sim", "dist")
BATCHING = ("auto", "vmap", "loop")
SPLITS = ("iid", "shards", "dirichlet", "play")
SECTIONS = {"algo": "algo_options", "task": "task_options", "split": "split_options",
            "network": "network_options", "topology": "topology_options"}


@dataclass(frozen=True)
class RunConfig:
    algo: str = "localsgd"
    algo_options: dict[str, Any] = field(default_factory=dict)
    task: str = "mnist1d"
    task_options: dict[str, Any] = field(default_factory=dict)
    workers: int = 8
    split: str = "iid"
    split_options: dict[str, Any] = field(default_factory=dict)
    network: str = "cloud"
    network_options: dict[str, Any] = field(default_factory=dict)
    topology: str = "complete"
    topology_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    steps: int | None = None
    epochs: float | None = None
    evals: int = 20
    seed: int = 0
    runtime: str = "sim"
    batching: str = "auto"
    eval_samples: int = 0  # 0: the whole test set at every evaluation
    threads: int = 1  # torch intra-op threads; 0 keeps torch's default (see run.py)
    data_dir: str | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers must be a positive integer, got {self.workers!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ConfigError(f"steps (local steps per worker) must be a positive integer, "
                              f"got {self.steps!r}")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"epochs must be a positive number, got {self.epochs!r}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either steps or epochs, not both")
        if not isinstance(self.evals, int) or self.evals < 1:
            raise ConfigError(f"evals must be a positive integer, got {self.evals!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {self.runtime!r}; choose one of: "
                              f"{', '.join(RUNTIMES)}")
        if self.batching not in BATCHING:
            raise ConfigError(f"unknown batching {self.batching!r}; choose one of: "
                              f"{', '.join(BATCHING)}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"threads must be an integer >= 0, got {self.threads!r}")
        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}; choose one of: {', '.join(SPLITS)}")
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"data directory {self.data_dir!r} does not exist; give the "
                              "folder that holds the data set's files")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["milestones"] = list(self.train.milestones)
        d["compute"]["speed_factors"] = list(self.compute.speed_factors)
        return d


def _typed(cls: type, values: dict[str, Any], what: str) -> Any:
    """Build dataclass ``cls`` from ``values``; unknown keys and wrong types are one line."""
    known = {f.name: f for f in fields(cls)}
    for k in values:
        if k not in known:
            raise ConfigError(f"unknown {what} option {k!r}; choose one of: "
                              f"{', '.join(known) or '(none)'}")
    conv = {}
    for k, v in values.items():
        conv[k] = _coerce(v, known[k].type, f"{what}.{k}")
    try:
        return cls(**conv)
    except TypeError as e:
        raise ConfigError(f"bad {what} options: {e}") from None


def _coerce(v: Any, typ: Any, key: str) -> Any:
    t = str(typ)
    if v is None:
        if "None" in t:
            return None
        raise ConfigError(f"{key} must not be null")
    try:
        if t.startswith("tuple"):
            return tuple(v) if isinstance(v, (list, tuple)) else (v,)
        if t in ("int", "int | None"):
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return int(v)
        if t in ("float", "float | None"):
            if isinstance(v, bool):
                raise ValueError
            return float(v)
        if t == "bool":
            if not isinstance(v, bool):
                raise ValueError
            return v
        if t in ("str", "str | None"):
            if not isinstance(v, str):
                raise ValueError
            return v
    except (TypeError, ValueError):
        want = t.replace(" | None", "")
        raise ConfigError(f"{key} must be a {want}, got {v!r}") from None
    return v


def from_dict(d: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a plain dict (a YAML file's content)."""
    if not isinstance(d, dict):
        raise ConfigError("a config file must hold a mapping of keys to values")
    d = dict(d)
    train_d = dict(d.pop("train", None) or {})
    task = d.get("task", RunConfig.task)
    if isinstance(task, str):
        from .tasks import TASKS

        if task in TASKS:  # an unknown task is reported when the run is prepared
            train_d = {**getattr(TASKS.module(task), "TRAIN_DEFAULTS", {}), **train_d}
    train = _typed(TrainConfig, train_d, "train")
    compute = _typed(ComputeConfig, d.pop("compute", None) or {}, "compute")
    for sec in SECTIONS.values():
        if not isinstance(d.get(sec, {}) or {}, dict):
            raise ConfigError(f"{sec} must be a mapping, got {d[sec]!r}")
        d[sec] = dict(d.get(sec) or {})
    cfg = _typed(RunConfig, d, "run")
    return dataclasses.replace(cfg, train=train, compute=compute)


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path!r} is not valid YAML{where}") from None
    return data or {}


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_set(d: dict[str, Any], item: str, option_names: dict[str, list[str]]) -> None:
    """Apply one ``--set key=value`` to the raw config dict ``d`` (in place).

    ``option_names`` maps "algo", "task" to the option names they accept (for bare keys).
    """
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    value = parse_value(text)
    head, dot, rest = key.partition(".")
    if dot:
        if head in SECTIONS:
            d.setdefault(SECTIONS[head], {})[rest] = value
        elif head in ("train", "compute"):
            d.setdefault(head, {})[rest] = value
        else:
            raise ConfigError(f"unknown --set section {head!r}; choose one of: "
                              f"{', '.join([*SECTIONS, 'train', 'compute'])}")
        return
    if key in option_names.get("algo", []):
        d.setdefault("algo_options", {})[key] = value
    elif key in option_names.get("task", []):
        d.setdefault("task_options", {})[key] = value
    elif key in {f.name for f in fields(TrainConfig)}:
        d.setdefault("train", {})[key] = value
    elif key in {f.name for f in fields(RunConfig)}:
        d[key] = value
    else:
        choices = sorted({*option_names.get("algo", []), *option_names.get("task", []),
                          *(f.name for f in fields(TrainConfig))})
        raise ConfigError(f"unknown option {key!r} for --set; choose one of: "
                          f"{', '.join(choices)} (or a dotted key such as split.alpha)")


def dump_yaml(d: dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(d, f, sort_keys=False)
