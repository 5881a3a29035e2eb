"""What a task is: a model, a loss, a metric, a data set, and how the data is split.

A task plug-in is a module with a function ``build(opts: dict, data_dir: str | None,
seed: int) -> TaskSpec`` and a dict ``OPTIONS`` of its options with defaults; unknown
option keys are a ConfigError naming the choices (see :func:`check_options`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError


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
