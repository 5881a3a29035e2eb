"""What a task is: a model, a loss, a metric, a data set, and how the data is split.

A task plug-in is a module with a function ``build(opts: dict, data_dir: str | None,
seed: int) -> TaskSpec`` and a dict ``OPTIONS`` of its options with defaults; unknown
option keys are a ConfigError naming the choices (see :func:`check_options`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import require_float, require_int
from ..errors import ConfigError, DataError

DATA_ENV = "RELAXSGD_DATA_DIR"


@dataclass(frozen=True)
class Dataset:
    """Whole data set in memory: float32 inputs ``(N, *shape)``, int64 labels ``(N,)``
    (or float32 targets for regression)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int  # 0 for regression


@dataclass(frozen=True)
class TaskSpec:
    """Everything the runtimes need to train and evaluate one task.

    ``model_fn()`` builds a fresh model (parameters are then overwritten by the shared
    initial ones); ``loss_fn(output, target)`` is the mean loss of a batch;
    ``metric`` names what is reported as "accuracy" ("accuracy" for classification,
    "neg_loss" for regression, where higher is better too); ``augment(x, generator)``,
    when set, augments a training batch (CIFAR-10 crops and flips); ``optimum`` is the
    known minimiser (flat parameters) for theory checks (quadratic task).
    """

    name: str
    data: Dataset
    model_fn: Callable[[], nn.Module]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric: str = "accuracy"
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
    optimum: Tensor | None = None
    batching: str = "auto"  # the simulator's preference: "vmap", "loop" or "auto"


def check_options(task: str, opts: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge ``opts`` over ``defaults``; an unknown key is one clear ConfigError."""
    for key in opts:
        if key not in defaults:
            raise ConfigError(f"unknown option {key!r} for task {task!r}; "
                              f"choose one of: {', '.join(sorted(defaults)) or '(none)'}")
    return {**defaults, **opts}


def check_choice(task: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else one ConfigError naming them."""
    if value not in choices:
        raise ConfigError(f"option {key}={value!r} of task {task!r} is not valid; "
                          f"choose one of: {', '.join(choices)}")
    return str(value)


def check_int(task: str, key: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is an integer >= ``minimum``, else one ConfigError."""
    return require_int(value, f"option {key}={value!r} of task {task!r}", at_least=minimum)


def check_float(task: str, key: str, value: Any, minimum: float) -> float:
    """``value`` as a float if it is a number >= ``minimum``, else one ConfigError."""
    return require_float(value, f"option {key}={value!r} of task {task!r}", at_least=minimum)


def check_hidden(task: str, value: Any) -> tuple[int, ...]:
    """The ``hidden`` option (MLP layer widths, a list of positive ints) as a tuple."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if (not isinstance(value, (list, tuple)) or not value
            or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in value)):
        raise ConfigError(f"option hidden={value!r} of task {task!r} must be a non-empty "
                          "list of positive integers, e.g. [256, 256]")
    return tuple(int(h) for h in value)


def data_root(task: str, data_dir: str | None, expected: str) -> Path:
    """``data_dir``, else ``$RELAXSGD_DATA_DIR``, as an existing directory; else one
    DataError saying what ``expected`` files are needed and how to point at them."""
    root = data_dir or os.environ.get(DATA_ENV)
    if not root:
        raise DataError(f"task {task!r} reads {expected}: pass --data-dir or set "
                        f"{DATA_ENV} to the folder that holds them")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {str(path)!r} for task {task!r} does not exist; "
                        f"it should hold {expected}")
    return path


def subsample(x: Tensor, y: Tensor, n: int, seed: int, task: str,
              key: str) -> tuple[Tensor, Tensor]:
    """A seeded random subset of ``n`` samples (``n == 0``: all), kept in file order."""
    if n == 0:
        return x, y
    if n > len(y):
        raise ConfigError(f"option {key}={n} of task {task!r} asks for more than the "
                          f"{len(y)} samples available; use 0 (all) or at most {len(y)}")
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n].sort()[0]
    return x[keep], y[keep]
