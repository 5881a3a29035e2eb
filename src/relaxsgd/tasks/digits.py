"""scikit-learn's 8x8 handwritten digits (1797 samples, 10 classes; bundled, no download).

A seeded random ``1 - test_fraction`` / ``test_fraction`` train/test split; each of the
64 pixels is standardised with the TRAINING mean and std (constant pixels are only
centred). Inputs are stored flat, ``(N, 64)``; the ``cnn`` model reshapes them to
``(1, 8, 8)`` itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Dataset, TaskSpec, check_choice, check_float, check_hidden, check_options
from .models import batching_for, model_factory

NAME = "digits"
MODELS = ("logreg", "mlp", "cnn")
OPTIONS: dict[str, Any] = {
    "model": "logreg",     # logreg, mlp or cnn (on 1x8x8)
    "test_fraction": 0.2,
    "hidden": [128],       # mlp only
}


def load(test_fraction: float, seed: int) -> Dataset:
    """The standardised, seeded split of ``sklearn.datasets.load_digits``."""
    from sklearn.datasets import load_digits  # heavy import: only when used

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32, device="cpu")
    y = torch.as_tensor(bunch.target, dtype=torch.int64, device="cpu")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed), device="cpu")
    n_test = round(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return Dataset(x[train], y[train], x[test], y[test], num_classes=10)


def build(opts: dict[str, Any], data_dir: str | None, seed: int) -> TaskSpec:
    """The digits task; ``data_dir`` is unused (the data ship with scikit-learn)."""
    o = check_options(NAME, opts, OPTIONS)
    model = check_choice(NAME, "model", o["model"], MODELS)
    frac = check_float(NAME, "test_fraction", o["test_fraction"], 0.0)
    if not 0 < frac < 1:
        raise ConfigError(f"option test_fraction={frac} of task 'digits' must be in (0, 1)")
    kw = {"hidden": check_hidden(NAME, o["hidden"])} if model == "mlp" else {}
    shape = (1, 8, 8) if model == "cnn" else (64,)
    return TaskSpec(name=NAME, data=load(frac, seed),
                    model_fn=model_factory(model, shape, 10, **kw), loss_fn=F.cross_entropy,
                    metric="accuracy", batching=batching_for(model))
