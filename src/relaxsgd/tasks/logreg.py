"""Synthetic multinomial logistic regression: a convex task for theory checks.

Features are i.i.d. standard Gaussian, ``x ~ N(0, I_dim)``; a random linear teacher
``W ~ N(0, 1/dim)`` (so each logit has unit variance) labels each sample with
``argmax(x @ W + noise * eps)``, ``eps ~ N(0, I)``: ``noise`` sets the label noise (0 is
linearly separable). Train and test sets come from the same distribution and the same
seeded generator; the default model (``logreg``) makes the loss convex.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import (
    MAX_WIDTH,
    Dataset,
    TaskSpec,
    check_choice,
    check_data_size,
    check_float,
    check_hidden,
    check_int,
    check_options,
)
from .models import batching_for, model_factory

NAME = "logreg"
MODELS = ("logreg", "mlp")
OPTIONS: dict[str, Any] = {
    "model": "logreg",   # logreg (convex) or mlp
    "n_train": 8000,
    "n_test": 2000,
    "dim": 32,
    "classes": 10,
    "noise": 0.5,        # std of the Gaussian noise added to the teacher's logits
    "hidden": [128],     # mlp only
}


def make_data(n_train: int, n_test: int, dim: int, classes: int, noise: float,
              seed: int) -> Dataset:
    """The seeded synthetic data set (see module doc)."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, classes, generator=g, device="cpu") / dim ** 0.5
    x = torch.randn(n_train + n_test, dim, generator=g, device="cpu")
    logits = x @ teacher + noise * torch.randn(n_train + n_test, classes, generator=g, device="cpu")
    y = logits.argmax(dim=1)
    return Dataset(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)


def build(opts: dict[str, Any], data_dir: str | None, seed: int) -> TaskSpec:
    """The logreg task; ``data_dir`` is unused (the data are generated from ``seed``)."""
    o = check_options(NAME, opts, OPTIONS)
    model = check_choice(NAME, "model", o["model"], MODELS)
    dim = check_int(NAME, "dim", o["dim"], 1)
    classes = check_int(NAME, "classes", o["classes"], 2, MAX_WIDTH)
    n_train = check_int(NAME, "n_train", o["n_train"], 1)
    n_test = check_int(NAME, "n_test", o["n_test"], 1)
    check_data_size(NAME, (n_train + n_test) * (dim + classes) + dim * classes,
                    "(n_train + n_test) x (dim + classes)")
    data = make_data(n_train, n_test, dim, classes,
                     check_float(NAME, "noise", o["noise"], 0.0), seed)
    kw = {"hidden": check_hidden(NAME, o["hidden"])} if model == "mlp" else {}
    return TaskSpec(name=NAME, data=data, model_fn=model_factory(model, (dim,), classes, **kw),
                    loss_fn=F.cross_entropy, metric="accuracy", batching=batching_for(model))
