"""CIFAR-10 (Krizhevsky 2009) from the standard python batches, with ResNet-20.

Reads ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` of the
``cifar-10-batches-py`` folder (the python version of
https://www.cs.toronto.edu/~kriz/cifar.html); ``data_dir`` (else
``$RELAXSGD_DATA_DIR``) may be that folder, its parent, or a parent holding
``cifar10/cifar-10-batches-py``. Each batch is a pickled dict with ``b"data"``, uint8
``(N, 3072)`` (channel-major 32x32 planes), and ``b"labels"``. The format is a pickle, so
the files are read with an unpickler that resolves only numpy's array reconstruction (no
other global: a file that names any, e.g. ``os.system``, is refused before it runs) and
files over 200 MB are refused before they are read. Inputs are ``(N, 3, 32, 32)``
float32, scaled to [0, 1] and normalised per channel with the usual CIFAR-10 training mean
and std.

Augmentation (He et al. 2016): a random 32x32 crop of the image padded by 4 on each
side, then a horizontal flip with probability 1/2, drawn from the given generator,
vectorised over the batch. Padding is with zeros after normalisation, i.e. with the
mean colour.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..devices import draw
from ..errors import ConfigError, DataError
from .base import (
    Dataset,
    TaskSpec,
    check_choice,
    check_hidden,
    check_int,
    check_options,
    data_root,
    subsample,
)
from .models import batching_for, model_factory

NAME = "cifar10"
MODELS = ("resnet20", "cnn", "mlp", "logreg")
# Training defaults for this task (He et al. 2016's ResNet-20 recipe, cosine instead of
# steps), under whatever the config says.
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                                  "schedule": "cosine", "warmup_steps": 100}

OPTIONS: dict[str, Any] = {
    "model": "resnet20",  # resnet20, cnn, or mlp / logreg on the flattened 3072 values
    "norm": "bn",         # resnet20 only: bn (BatchNorm) or gn (GroupNorm, buffer-free)
    "gn_groups": 2,       # resnet20 with norm gn: 2, 4 or 8 groups
    "augment": True,      # random crop (padding 4) and horizontal flip of training batches
    "n_train": 0,         # 0 = all 50000; else a seeded random subset
    "n_test": 0,          # 0 = all 10000
    "hidden": [256],      # mlp only
}
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
FOLDER = "cifar-10-batches-py"
BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_EXPECTED = (f"the CIFAR-10 python batches {', '.join(BATCHES)}, test_batch (folder "
             f"{FOLDER} of https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)")


MAX_BATCH_BYTES = 200 * 2**20  # a real batch is 31 MB


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch and nothing else: the only globals it resolves are
    numpy's array reconstruction (what ``pickle.dump`` of a dict of arrays and lists
    needs), so a file cannot name a function to call."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch "
                                     "never does")


def find_dir(data_dir: str | None) -> Path:
    """The ``cifar-10-batches-py`` folder (see module doc), or a DataError."""
    root = data_root(NAME, data_dir, _EXPECTED)
    for d in (root, root / FOLDER, root / "cifar10" / FOLDER, root / "cifar10"):
        if (d / "data_batch_1").is_file():
            return d
    raise DataError(f"no CIFAR-10 file data_batch_1 in {str(root)!r} or its {FOLDER} "
                    f"subfolder; expected {_EXPECTED}")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` of one pickled batch."""
    if path.is_file() and path.stat().st_size > MAX_BATCH_BYTES:
        raise DataError(f"CIFAR-10 file {str(path)!r} is {path.stat().st_size} bytes, more "
                        f"than a batch's ~31 MB; re-download {_EXPECTED}")
    if not path.is_file():
        raise DataError(f"CIFAR-10 file {path.name} not found in {str(path.parent)!r}; "
                        f"expected {_EXPECTED}")
    try:
        with path.open("rb") as f:
            d = _BatchUnpickler(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except pickle.UnpicklingError as e:  # a global outside the allow-list: refused
        raise DataError(f"CIFAR-10 file {str(path)!r} is not a python batch: {e}; "
                        f"re-download {_EXPECTED}") from None
    except Exception as e:  # any unpickling or layout problem is a bad file
        raise DataError(f"CIFAR-10 file {str(path)!r} is not a python batch dict with "
                        f"b'data' and b'labels' ({type(e).__name__}); re-download "
                        f"{_EXPECTED}") from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x) or (len(y) and (
            y.min() < 0 or y.max() > 9)):
        raise DataError(f"CIFAR-10 file {str(path)!r} has data {x.shape} and {len(y)} labels; "
                        f"expected (N, 3072) uint8 and N labels in 0..9")
    return x.reshape(-1, 3, 32, 32), y


def _stack(paths: list[Path]) -> tuple[Tensor, Tensor]:
    parts = [read_batch(p) for p in paths]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.concatenate([p[1] for p in parts]))


def load(data_dir: str | None) -> Dataset:
    """The whole CIFAR-10 data set, normalised (see module doc)."""
    folder = find_dir(data_dir)
    x_train, y_train = _stack([folder / b for b in BATCHES])
    x_test, y_test = _stack([folder / "test_batch"])
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10)


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop (pad 4) and horizontal flip of a batch ``(B, C, H, W)``; same shape."""
    b, _, h, w = x.shape
    pad = 4
    padded = F.pad(x, (pad, pad, pad, pad))
    # drawn on the generator's device (the CPU), used on x's: the same crops everywhere
    dy = draw(torch.randint, 0, 2 * pad + 1, (b, 1), generator=generator, device=x.device)
    dx = draw(torch.randint, 0, 2 * pad + 1, (b, 1), generator=generator, device=x.device)
    rows = dy + torch.arange(h, device=x.device)  # (B, H): the rows each sample keeps
    cols = dx + torch.arange(w, device=x.device)
    flip = draw(torch.rand, b, generator=generator, device=x.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # flipping = reversed columns
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def build(opts: dict[str, Any], data_dir: str | None, seed: int) -> TaskSpec:
    """The CIFAR-10 task; ``n_train`` / ``n_test`` subsample with ``seed`` for quick runs."""
    o = check_options(NAME, opts, OPTIONS)
    model = check_choice(NAME, "model", o["model"], MODELS)
    n_train = check_int(NAME, "n_train", o["n_train"], 0)
    n_test = check_int(NAME, "n_test", o["n_test"], 0)
    if not isinstance(o["augment"], bool):
        raise ConfigError(f"option augment={o['augment']!r} of task 'cifar10' must be "
                          "true or false")
    kw: dict[str, Any] = {}
    if model == "mlp":
        kw = {"hidden": check_hidden(NAME, o["hidden"])}
    elif model == "resnet20":
        kw = {"norm": check_choice(NAME, "norm", o["norm"], ("bn", "gn")),
              "gn_groups": check_int(NAME, "gn_groups", o["gn_groups"], 1)}
    model_fn = model_factory(model, (3, 32, 32), 10, **kw)
    d = load(data_dir)
    x_train, y_train = subsample(d.x_train, d.y_train, n_train, seed, NAME, "n_train")
    x_test, y_test = subsample(d.x_test, d.y_test, n_test, seed + 1, NAME, "n_test")
    return TaskSpec(name=NAME, data=Dataset(x_train, y_train, x_test, y_test, 10),
                    model_fn=model_fn, loss_fn=F.cross_entropy, metric="accuracy",
                    augment=augment if o["augment"] else None, batching=batching_for(model))
