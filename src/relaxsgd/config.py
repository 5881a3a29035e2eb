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
    compute: {profile: laptop-core, step_time_s: null}  # null: FLOPs / the profile's rate
    device: auto                 # auto (CUDA when present) | cpu | cuda | cuda:K
    epochs: 5                    # or steps: local steps per worker
    evals: 20
    seed: 0

``--set`` keys are dotted (``algo.p=8``, ``task.model=cnn``, ``split.alpha=0.1``,
``train.momentum=0.9``, ``compute.step_time_s=0.01``, ``network.latency_s=0.1``) or bare
(``p=8``: looked up in the algorithm's options, then the task's, then ``train``, then
the top level). Values are parsed as YAML (numbers, booleans, lists), numbers as a person
writes them (``1e-3`` is a float; see :mod:`.yamlio`).

Hostile or careless input: a config file is read by :mod:`.userfiles` (a regular file of at
most :data:`MAX_CONFIG_BYTES`), aliases cannot expand it, every section and name must have
its type, and every number that reaches the operating system or an allocation has a bound
(:data:`LIMITS`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .checks import require_at_most, require_float, require_int
from .elastic_config import ElasticConfig, elastic_from_dict
from .errors import ConfigError, shown
from .sim.compute import ComputeConfig
from .training import TrainConfig

RUNTIMES = ("sim", "dist")
BATCHING = ("auto", "vmap", "loop")
SPLITS = ("iid", "shards", "dirichlet", "play")
# The options each split takes (a misplaced one, e.g. split.alpha with iid, is refused
# rather than ignored), with the check of its value.
SPLIT_OPTIONS: dict[str, dict[str, Any]] = {
    "iid": {},
    "shards": {"shards_per_worker": lambda v, w: require_int(v, w, at_least=1),
               "min_size": lambda v, w: require_int(v, w, at_least=0)},
    "dirichlet": {"alpha": lambda v, w: require_float(v, w, above=0),
                  "min_size": lambda v, w: require_int(v, w, at_least=0)},
    "play": {},
}
# Keys a run writes into its config.yaml for the reader that are not options; a config
# file holding them is read as if they were absent (so a run's config.yaml reruns it).
DERIVED_KEYS = ("steps_per_worker",)
SECTIONS = {"algo": "algo_options", "task": "task_options", "split": "split_options",
            "network": "network_options", "topology": "topology_options"}
MAX_CONFIG_BYTES = 1 << 20  # a run's config.yaml is ~2 KB
# Upper bounds of the options that reach the operating system or an allocation: torch
# segfaults on set_num_threads(100000); every worker holds a model, every evaluation a row.
LIMITS = {"workers": (100_000, "a model each"),
          "threads": (1024, "torch intra-op threads; 0 keeps torch's default"),
          "evals": (100_000, "a row each"), "eval_samples": (10**9, "test samples"),
          "steps": (10**12, "local steps per worker")}


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
    eval_worker_samples: int = 0  # the workers' own models on this many (0: eval_samples)
    device: str = "auto"  # auto | cpu | cuda | cuda:K (devices.py); the simulator's device
    threads: int = 1  # torch intra-op threads; 0 keeps torch's default (see run.py)
    data_dir: str | None = None
    checkpoint_every: int | str | None = None  # local steps, or "<x>min" (checkpoint.py)
    out: str | None = None
    elastic: ElasticConfig = field(default_factory=ElasticConfig)  # elastic_config.py

    def __post_init__(self) -> None:
        require_int(self.workers, "workers", at_least=1)
        if self.steps is not None:
            require_int(self.steps, "steps (local steps per worker)", at_least=1)
        if self.epochs is not None:
            require_float(self.epochs, "epochs", above=0)
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give either steps or epochs, not both")
        require_int(self.evals, "evals", at_least=1)
        require_int(self.seed, "seed", at_least=0, at_most=2**63 - 1)
        require_int(self.threads, "threads", at_least=0)
        require_int(self.eval_samples, "eval_samples", at_least=0)
        for key, (limit, why) in LIMITS.items():
            if getattr(self, key) is not None:
                require_at_most(getattr(self, key), key, limit, why)
        if len(self.compute.speed_factors) > self.workers:
            raise ConfigError(f"compute.speed_factors has {len(self.compute.speed_factors):,} "
                              f"factors for {self.workers} workers; give at most one per "
                              "worker (a shorter list repeats)")
        require_int(self.eval_worker_samples, "eval_worker_samples", at_least=0)
        from .devices import check_device

        check_device(self.device)
        from .checkpoint import parse_every

        parse_every(self.checkpoint_every)
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"unknown runtime {self.runtime!r}; choose one of: "
                              f"{', '.join(RUNTIMES)}")
        if self.batching not in BATCHING:
            raise ConfigError(f"unknown batching {self.batching!r}; choose one of: "
                              f"{', '.join(BATCHING)}")
        if self.split not in SPLITS:
            raise ConfigError(f"unknown split {self.split!r}; choose one of: {', '.join(SPLITS)}")
        check_split_options(self.split, self.split_options)
        self.elastic.check(self.workers)
        if self.data_dir is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"data directory {self.data_dir!r} does not exist; give the "
                              "folder that holds the data set's files")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["milestones"] = list(self.train.milestones)
        d["compute"]["speed_factors"] = list(self.compute.speed_factors)
        return d


def check_split_options(split: str, options: dict[str, Any]) -> None:
    """ConfigError if ``options`` has a key ``split`` does not take or a bad value."""
    known = SPLIT_OPTIONS.get(split, {})
    for key, value in options.items():
        if key not in known:
            takes = ", ".join(f"split.{k}" for k in known) or "no options"
            raise ConfigError(f"split {split!r} has no option {key!r} (it takes {takes}); "
                              f"e.g. --split dirichlet --set split.alpha=0.1")
        known[key](value, f"split.{key}")


# The type of every name and section of a config (checked before any name is looked up,
# so that `algo: [localsgd]` is a line, not "unhashable type").
_NAMES = ("algo", "task", "split", "network", "topology", "runtime", "batching")


def check_types(d: dict[str, Any], where: str = "the config") -> None:
    """ConfigError if a name of ``d`` is not a string or a section not a mapping."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must hold a mapping of keys to values, got "
                          f"{type(d).__name__} {shown(d)}")
    for key in _NAMES:
        if d.get(key) is not None and not isinstance(d[key], str):
            raise ConfigError(f"{key} must be a name (a string), got {shown(d[key])} in "
                              f"{where}; e.g. {key}: {getattr(RunConfig, key)}")
    for key in (*SECTIONS.values(), "train", "compute"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise ConfigError(f"{key} must be a mapping of options, got "
                              f"{type(d[key]).__name__} {shown(d[key])} in {where}; e.g. "
                              f"{key}: {{}}")


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
            return require_int(v, key)  # True, 2.0 and '3' are refused everywhere
        if t in ("float", "float | None"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError
            return require_float(v, key)  # NaN and infinities are refused everywhere
        if t == "bool":
            if not isinstance(v, bool):
                raise ValueError
            return v
        if t in ("str", "str | None"):
            if not isinstance(v, str):
                raise ValueError
            return v
    except ConfigError:
        raise  # require_int's or require_float's own line
    except (TypeError, ValueError):
        want = t.replace(" | None", "")
        raise ConfigError(f"{key} must be a {want}, got {shown(v)}") from None
    return v


def from_dict(d: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from a plain dict (a YAML file's content)."""
    check_types(d)
    d = {k: v for k, v in d.items() if k not in DERIVED_KEYS}
    train_d = dict(d.pop("train", None) or {})
    task = d.get("task", RunConfig.task)
    if isinstance(task, str):
        from .tasks import TASKS

        if task in TASKS:  # an unknown task is reported when the run is prepared
            train_d = {**getattr(TASKS.module(task), "TRAIN_DEFAULTS", {}), **train_d}
    train = _typed(TrainConfig, train_d, "train")
    compute = _typed(ComputeConfig, d.pop("compute", None) or {}, "compute")
    elastic = elastic_from_dict(d.pop("elastic", None))
    for sec in SECTIONS.values():
        d[sec] = dict(d.get(sec) or {})
    cfg = _typed(RunConfig, d, "run")
    return dataclasses.replace(cfg, train=train, compute=compute, elastic=elastic)


def load_yaml(path: str) -> dict[str, Any]:
    """The mapping in config file ``path`` (empty file: {}); one ConfigError line if it is
    not a regular file of at most :data:`MAX_CONFIG_BYTES`, not text, not YAML, or not a
    mapping."""
    from .userfiles import read_text
    from .yamlio import load_yaml_text

    hint = "give a YAML file such as a run's config.yaml"
    if os.path.isdir(path):
        hint = f"give a YAML file, e.g. {os.path.join(path, 'config.yaml')!r}"
    text = read_text(path, "config file", MAX_CONFIG_BYTES, hint)
    data = load_yaml_text(text, f"config file {path!r}")
    if data is None:
        return {}
    check_types(data, f"config file {path!r}")
    return data


def parse_value(text: str) -> Any:
    """A --set value as YAML (numbers as a person writes them, :mod:`.yamlio`; ``nan`` and
    ``inf`` are read as the numbers, to be refused by the option's check with a clear line
    rather than as a string of the wrong type); text that is not YAML stays a string."""
    from .yamlio import load_yaml_text

    if text.strip().lower() in ("nan", "inf", "+inf", "-inf", "infinity", "-infinity"):
        return float(text.strip().lower().replace("infinity", "inf"))
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"a --set value of {len(text):,} characters is refused; a config "
                          f"file holds at most {MAX_CONFIG_BYTES:,} bytes")
    try:
        return load_yaml_text(text, "--set value")
    except ConfigError as e:
        if "not valid YAML" in str(e):
            return text
        raise


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

    def section(name: str) -> dict[str, Any]:  # a null section (``train:``) is empty
        if d.get(name) is None:
            d[name] = {}
        if not isinstance(d[name], dict):
            raise ConfigError(f"{name} must be a mapping of options, got {shown(d[name])}")
        return d[name]

    if dot:
        if head in SECTIONS:
            section(SECTIONS[head])[rest] = value
        elif head in ("train", "compute"):
            section(head)[rest] = value
        elif head == "elastic":  # elastic.min_quorum=2, elastic.churn.mtbf_s=600
            sub, dot2, leaf = rest.partition(".")
            section(head)
            if dot2 and sub == "churn":
                if d[head].get("churn") is None:
                    d[head]["churn"] = {}
                d[head]["churn"][leaf] = value
            else:
                d[head][rest] = value
        else:
            raise ConfigError(f"unknown --set section {head!r}; choose one of: "
                              f"{', '.join([*SECTIONS, 'train', 'compute', 'elastic'])}")
        return
    if key in option_names.get("algo", []):
        section("algo_options")[key] = value
    elif key in option_names.get("task", []):
        section("task_options")[key] = value
    elif key in {f.name for f in fields(TrainConfig)}:
        section("train")[key] = value
    elif key in {f.name for f in fields(RunConfig)}:
        d[key] = value
    else:
        choices = sorted({*option_names.get("algo", []), *option_names.get("task", []),
                          *(f.name for f in fields(TrainConfig))})
        raise ConfigError(f"unknown option {shown(key)} for --set; choose one of: "
                          f"{', '.join(choices)} (or a dotted key such as split.alpha)")


def dump_yaml(d: dict[str, Any], path: str) -> None:
    """Write ``d`` as YAML to ``path`` atomically (a temporary file, then a rename)."""
    from .outputs import atomic_write

    atomic_write(path, yaml.safe_dump(d, sort_keys=False))
