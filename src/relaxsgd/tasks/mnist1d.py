"""MNIST-1D (Greydanus, "Scaling down Deep Learning", 2020): 40-sample 1-D digit signals.

Generated in memory by the ``mnist1d`` package with ``make_dataset`` and the run's seed
(never ``get_dataset``, which downloads); 4000 samples take about half a second. The
package seeds Python's and NumPy's global generators; their states are restored
afterwards so that building the task has no side effect. Inputs are ``(N, 40)``
(standardised by the package); the ``cnn`` model treats them as one channel of
length 40. The last few generated sets are kept (as NumPy arrays; every build gets its
own tensors), since a process that builds the task again with the same size and seed
(``relaxsgd tune``'s trials, ``compare``) would otherwise spend seconds (10,000 samples:
about 5 s) generating the same data.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import (
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

NAME = "mnist1d"
MODELS = ("mlp", "logreg", "cnn")
OPTIONS: dict[str, Any] = {
    "model": "mlp",        # mlp, logreg or cnn (1-D convolutions)
    "num_samples": 4000,   # train + test, a multiple of 10 (samples per class are equal)
    "train_split": 0.8,
    "hidden": [256, 256],  # mlp only
}


@functools.lru_cache(maxsize=4)
def _made(num_samples: int, train_split: float, seed: int) -> dict[str, np.ndarray]:
    """``make_dataset``'s arrays (read-only, shared by every build with these arguments)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = num_samples, train_split, seed
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    out = {k: np.array(d[k]) for k in ("x", "y", "x_test", "y_test")}
    for a in out.values():
        a.setflags(write=False)
    return out


def generate(num_samples: int, train_split: float, seed: int) -> Dataset:
    """MNIST-1D from ``mnist1d.data.make_dataset`` with the given size and seed (fresh
    tensors at every call, from the kept arrays when these arguments were seen)."""
    d = _made(num_samples, float(train_split), seed)

    def f32(a: np.ndarray) -> torch.Tensor:  # a copy: a caller may write its tensors
        return torch.tensor(a, dtype=torch.float32, device="cpu")

    def i64(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.int64, device="cpu")

    return Dataset(f32(d["x"]), i64(d["y"]), f32(d["x_test"]), i64(d["y_test"]), 10)


def build(opts: dict[str, Any], data_dir: str | None, seed: int) -> TaskSpec:
    """The MNIST-1D task; ``data_dir`` is unused (the data are generated from ``seed``)."""
    o = check_options(NAME, opts, OPTIONS)
    model = check_choice(NAME, "model", o["model"], MODELS)
    num = check_int(NAME, "num_samples", o["num_samples"], 20)
    check_data_size(NAME, num * 40 * 4, "num_samples x 40, and the generator's copies")
    split = check_float(NAME, "train_split", o["train_split"], 0.0)
    if not 0 < split < 1:
        raise ConfigError(f"option train_split={split} of task 'mnist1d' must be in (0, 1)")
    data = generate(num, split, seed)
    if len(data.y_train) == 0 or len(data.y_test) == 0:
        raise ConfigError(f"mnist1d with num_samples={num}, train_split={split} leaves an "
                          "empty train or test set; use more samples or another split")
    kw = {"hidden": check_hidden(NAME, o["hidden"])} if model == "mlp" else {}
    shape = (1, 40) if model == "cnn" else (40,)
    return TaskSpec(name=NAME, data=data, model_fn=model_factory(model, shape, 10, **kw),
                    loss_fn=F.cross_entropy, metric="accuracy", batching=batching_for(model))
