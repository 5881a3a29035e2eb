"""Synthetic least squares with a known optimum: the theory-check task.

``x ~ N(0, I_dim)``, ``y = x @ w* + noise * eps`` with ``w* ~ N(0, I)`` and
``eps ~ N(0, 1)``; targets are float32 of shape ``(N,)``. The model is
``nn.Linear(dim, 1, bias=False)`` and the loss ``0.5 * mean((x @ w - y)^2)``, so the
problem is strongly convex (for ``n_train >= dim``) with smoothness the largest
eigenvalue of ``X^T X / N`` (about 1 for many samples). ``TaskSpec.optimum`` is the
exact minimiser of the TRAINING loss (least squares in float64), as the model's flat
parameter vector; the metric is "neg_loss" (higher is better).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .base import (
    Dataset,
    TaskSpec,
    check_choice,
    check_data_size,
    check_float,
    check_int,
    check_options,
)

NAME = "quadratic"
OPTIONS: dict[str, Any] = {
    "model": "linear",   # nn.Linear(dim, 1, bias=False): the only model with a known optimum
    "n_train": 2000,
    "n_test": 500,
    "dim": 20,
    "noise": 0.1,        # std of the target noise (the loss at the optimum is ~noise^2 / 2)
}


def half_mse(output: Tensor, target: Tensor) -> Tensor:
    """``0.5 * mean((output - target)^2)``; output ``(B, 1)`` against targets ``(B,)``."""
    return 0.5 * (output.reshape(target.shape) - target).pow(2).mean()


def linear(dim: int) -> nn.Module:
    """The model: ``x @ w`` with ``w`` of shape ``(1, dim)``, no bias."""
    return nn.Linear(dim, 1, bias=False)


def least_squares(x: Tensor, y: Tensor) -> Tensor:
    """The minimiser of ``0.5 * mean((x @ w - y)^2)`` over ``w``, computed in float64."""
    sol = torch.linalg.lstsq(x.double(), y.double().reshape(-1, 1)).solution
    return sol.reshape(-1).float()


def build(opts: dict[str, Any], data_dir: str | None, seed: int) -> TaskSpec:
    """The quadratic task; ``data_dir`` is unused (the data are generated from ``seed``)."""
    o = check_options(NAME, opts, OPTIONS)
    check_choice(NAME, "model", o["model"], ("linear",))
    dim = check_int(NAME, "dim", o["dim"], 1)
    n_train = check_int(NAME, "n_train", o["n_train"], 1)
    n_test = check_int(NAME, "n_test", o["n_test"], 1)
    noise = check_float(NAME, "noise", o["noise"], 0.0)
    check_data_size(NAME, (n_train + n_test + dim) * dim, "(n_train + n_test + dim) x dim")
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(dim, generator=g, device="cpu")
    x = torch.randn(n_train + n_test, dim, generator=g, device="cpu")
    y = x @ w_star + noise * torch.randn(n_train + n_test, generator=g, device="cpu")
    data = Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes=0)
    return TaskSpec(name=NAME, data=data, model_fn=partial(linear, dim), loss_fn=half_mse,
                    metric="neg_loss", optimum=least_squares(data.x_train, data.y_train),
                    batching="vmap")
