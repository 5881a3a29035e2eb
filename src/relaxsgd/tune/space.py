"""Search spaces: the algorithm's declared options plus the task recipe's training options,
narrowed or fixed by the user, checked against the options they name.

Keys are dotted, as in ``--set``: ``algo.<option>`` (a field of the algorithm's Config)
and ``train.<option>`` (a field of :class:`~relaxsgd.training.TrainConfig`, plus
``train.beta1`` and ``train.beta2`` for AdamW's ``betas``). The algorithm's part is its
``search_space`` class attribute; the training part is derived from the job's resolved
training recipe (:func:`train_space`): the learning rate from a tenth to ten times the
recipe's, log scale; SGD's momentum in [0, 0.95]; AdamW's beta1 in [0.8, 0.95]; the
warm-up in [0, 100] steps.

A ``--space`` file (YAML) narrows or fixes keys, for every algorithm or per algorithm::

    train.lr: {low: 0.02, high: 0.3, log: true}    # every algorithm
    localsgd:
      algo.p: {low: 2, high: 32}
      train.momentum: 0.9                          # a single value fixes the key
    swarm:
      algo.bits: [4, 8]                            # a list: one of these values

A key the algorithm's (or the training) options do not have, a range outside the range the
algorithm declares, or a value the option refuses is one line (ConfigError, exit 2); the
training ranges derived from the recipe may be widened.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError
from .params import Choice, Float, Int, Param, contains

BETAS = {"train.beta1": 0, "train.beta2": 1}


@dataclass(frozen=True)
class Space:
    """The keys one algorithm's trials sample, each with its distribution."""

    algo: str
    params: dict[str, Param]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One value per key from an Optuna trial (``suggest_*``)."""
        out: dict[str, Any] = {}
        for key, p in self.params.items():
            if isinstance(p, Float):
                out[key] = trial.suggest_float(key, p.low, p.high, log=p.log)
            elif isinstance(p, Int):
                out[key] = trial.suggest_int(key, p.low, p.high, log=p.log)
            else:
                out[key] = trial.suggest_categorical(key, list(p.choices))
        return out


def algorithm_space(algo: str) -> dict[str, Param]:
    """The algorithm's declared ``search_space`` as dotted keys, checked
    (:func:`check_declared`)."""
    check_declared(algo)
    from ..algorithms import ALGORITHMS

    return {f"algo.{k}": p for k, p in ALGORITHMS.get(algo).search_space.items()}


def check_declared(algo: str) -> None:
    """ConfigError unless every key of ``algo``'s ``search_space`` is an option of its
    Config, with a valid declaration whose bounds (or choices) the Config accepts."""
    from ..algorithms import ALGORITHMS

    cls = ALGORITHMS.get(algo)
    names = {f.name for f in fields(cls.Config)}
    for key, p in cls.search_space.items():
        if key not in names:
            raise ConfigError(f"algorithm {algo!r} declares search_space key {key!r}, which "
                              f"is not one of its options ({', '.join(sorted(names))})")
        if not isinstance(p, (Float, Int, Choice)):
            raise ConfigError(f"algorithm {algo!r}: search_space[{key!r}] must be Float, "
                              f"Int or Choice, got {p!r}")
        if isinstance(p, Choice):
            if not p.choices:
                raise ConfigError(f"algorithm {algo!r}: search_space[{key!r}] has no choices")
        elif not p.low <= p.high or (p.log and p.low <= 0):
            raise ConfigError(f"algorithm {algo!r}: search_space[{key!r}] has bounds "
                              f"[{p.low}, {p.high}]{' (log scale needs low > 0)' * p.log}")
        for v in (p.choices if isinstance(p, Choice) else p.bounds()):
            check_value(algo, f"algo.{key}", v)


def train_space(train: Any) -> dict[str, Param]:
    """The training options searched by default, around the job's recipe ``train``."""
    lr = float(train.lr)
    out: dict[str, Param] = {"train.lr": Float(lr / 10, lr * 10, log=True)}
    if train.optimizer == "sgd":
        out["train.momentum"] = Float(0.0, 0.95)
    else:
        out["train.beta1"] = Float(0.8, 0.95)
    out["train.warmup_steps"] = Int(0, 100)
    return out


def check_value(algo: str, key: str, value: Any) -> None:
    """ConfigError (one line) unless ``key`` is an option of ``algo`` or of training that
    accepts ``value``."""
    from ..algorithms import ALGORITHMS
    from ..config import _typed
    from ..training import TrainConfig

    section, _, name = key.partition(".")
    if section == "algo":
        cls = ALGORITHMS.get(algo).Config
        known = [f.name for f in fields(cls)]
        if name not in known:
            raise ConfigError(f"{algo} has no option {key!r}; its options: "
                              f"{', '.join('algo.' + k for k in known)}")
        what = lambda: _typed(cls, {name: value}, f"algorithm {algo!r}")  # noqa: E731
    elif section == "train":
        known = [f.name for f in fields(TrainConfig)] + [k[6:] for k in BETAS]
        if name not in known:
            raise ConfigError(f"training has no option {key!r}; its options: "
                              f"{', '.join('train.' + k for k in known)}")
        if key in BETAS:
            betas = [0.9, 0.999]
            betas[BETAS[key]] = value
            what = lambda: _typed(TrainConfig, {"betas": betas, "optimizer": "adamw"},  # noqa: E731
                                  "train")
        else:
            what = lambda: _typed(TrainConfig, {name: value}, "train")  # noqa: E731
    else:
        raise ConfigError(f"search-space key {key!r} must start with algo. or train. "
                          "(e.g. algo.p, train.lr)")
    try:
        what()
    except ConfigError as e:
        raise ConfigError(f"{algo}: {key}={value!r} is out of range ({e})") from None


def narrow(algo: str, space: dict[str, Param], key: str, spec: Any
           ) -> tuple[dict[str, Param], Any]:
    """``space`` with ``key`` narrowed by a --space file's ``spec``; returns (space, fixed
    value or None). A dict spec is a range, a list the choices, a scalar a fixed value."""
    # the algorithm's declared ranges bound what a file may ask; the training ranges
    # derived from the recipe are only a starting point (the option's own checks bound it)
    declared = space.get(key) if key.startswith("algo.") else None
    out = dict(space)
    if isinstance(spec, dict):
        extra = set(spec) - {"low", "high", "log"}
        if extra or not {"low", "high"} <= set(spec):
            raise ConfigError(f"--space {algo}: {key} must be a value, a list of values or "
                              f"{{low: .., high: .., log: ..}}, got {spec!r}")
        low, high = spec["low"], spec["high"]
        is_int = isinstance(declared, Int) or (
            declared is None and all(isinstance(v, int) and not isinstance(v, bool)
                                     for v in (low, high)))
        p: Param = (Int if is_int else Float)(low, high, bool(spec.get("log", False)))
        if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) \
                or low > high or (p.log and low <= 0):
            raise ConfigError(f"--space {algo}: {key} range [{low}, {high}] is not a range "
                              "(numbers, low <= high, low > 0 in log scale)")
        values: list[Any] = [low, high]
    elif isinstance(spec, list):
        if not spec:
            raise ConfigError(f"--space {algo}: {key} has an empty list of choices")
        p, values = Choice(tuple(spec)), list(spec)
    else:
        p, values = None, [spec]  # type: ignore[assignment]
    for v in values:
        check_value(algo, key, v)
        if declared is not None and not isinstance(declared, Choice) \
                and not contains(declared, v) and not isinstance(declared, Choice):
            raise ConfigError(f"--space {algo}: {key}={v!r} is outside the declared range "
                              f"[{declared.low}, {declared.high}]")
        if isinstance(declared, Choice) and v not in declared.choices:
            raise ConfigError(f"--space {algo}: {key}={v!r} is not one of the declared "
                              f"choices {list(declared.choices)}")
    if p is None:
        out.pop(key, None)
        return out, spec
    out[key] = p
    return out, None


def apply_params(d: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw config dict ``d`` with the dotted ``params`` set in it."""
    import copy

    out = copy.deepcopy(d)
    for key, value in params.items():
        section, _, name = key.partition(".")
        if section == "algo":
            out.setdefault("algo_options", {})[name] = value
        elif key in BETAS:
            train = out.setdefault("train", {})
            betas = list(train.get("betas") or _resolved_betas(out))
            betas[BETAS[key]] = value
            train["betas"] = betas
        else:
            out.setdefault("train", {})[name] = value
    return out


def _resolved_betas(d: dict[str, Any]) -> tuple[float, ...]:
    from ..config import from_dict

    return tuple(from_dict({**d, "out": None}).train.betas)


def current_values(cfg: Any, algo_cfg: Any, keys: list[str]) -> dict[str, Any]:
    """The values the job ``cfg`` (a RunConfig) and its algorithm config give ``keys``."""
    out: dict[str, Any] = {}
    for key in keys:
        section, _, name = key.partition(".")
        if section == "algo":
            out[key] = getattr(algo_cfg, name)
        elif key in BETAS:
            out[key] = cfg.train.betas[BETAS[key]]
        else:
            out[key] = getattr(cfg.train, name)
    return out


def as_plain(p: Param) -> dict[str, Any]:
    """A declaration as plain data (tune.json, the report)."""
    return {"kind": type(p).__name__.lower(), **dataclasses.asdict(p)}


def build_space(algo: str, train: Any, fixed: set[str], specs: dict[str, Any]
                ) -> tuple[Space, dict[str, Any]]:
    """``algo``'s space for a job whose resolved training recipe is ``train``: declared
    keys plus :func:`train_space`, less the keys ``fixed`` by --set, narrowed by the
    --space file's ``specs`` for this algorithm. Returns the space and the values the file
    fixes (to be set in the job)."""
    space = {**algorithm_space(algo), **train_space(train)}
    fixed_values: dict[str, Any] = {}
    for key, spec in specs.items():
        space, value = narrow(algo, space, key, spec)
        if value is not None:
            fixed_values[key] = value
    for key in fixed:
        space.pop(key, None)
    return Space(algo, space), fixed_values


def load_space_file(path: str, algos: list[str]) -> dict[str, dict[str, Any]]:
    """A --space file as {algo: {key: spec}} (keys at the top apply to every algorithm)."""
    from ..algorithms import ALGORITHMS
    from ..config import load_yaml

    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"--space file {path!r} must hold a mapping of keys to ranges")
    common = {k: v for k, v in data.items() if "." in str(k)}
    out = {a: dict(common) for a in algos}
    for k, v in data.items():
        if "." in str(k):
            continue
        if k not in ALGORITHMS:
            raise ConfigError(f"--space file {path!r}: {k!r} is neither an algorithm nor a "
                              "dotted key such as algo.p or train.lr")
        if k not in out:
            raise ConfigError(f"--space file {path!r} narrows {k!r}, which --algos does not "
                              f"tune ({', '.join(algos)})")
        if not isinstance(v, dict):
            raise ConfigError(f"--space file {path!r}: {k} must map keys to ranges")
        out[k].update(v)
    return out
