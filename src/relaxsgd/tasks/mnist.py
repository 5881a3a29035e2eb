"""MNIST (LeCun et al. 1998) from the four standard IDX files, plain or gzipped.

The directory is ``data_dir``, else ``$RELAXSGD_DATA_DIR``; the files may sit in it
directly or in its ``mnist`` (or torchvision's ``MNIST/raw``) subfolder. Accepted names:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally with ``.gz``, and the dotted variants
(``train-images.idx3-ubyte``). Magic numbers, dimensions and sizes are checked; any
problem is one DataError naming the file. Inputs are ``(N, 1, 28, 28)`` float32,
scaled to [0, 1] and normalised with the usual MNIST mean 0.1307 and std 0.3081.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
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

NAME = "mnist"
MODELS = ("cnn", "logreg", "mlp")
# Training defaults for this task, under whatever the config says: with them all-reduce SGD
# on 8 workers reaches >= 98% test accuracy in 2 epochs (measured; see the README).
TRAIN_DEFAULTS: dict[str, Any] = {"lr": 0.05, "momentum": 0.9}

OPTIONS: dict[str, Any] = {
    "model": "cnn",      # cnn, or logreg / mlp on the flattened 784 pixels
    "n_train": 0,        # 0 = all 60000; else a seeded random subset
    "n_test": 0,         # 0 = all 10000
    "hidden": [128],     # mlp only
}
MEAN, STD = 0.1307, 0.3081
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
         "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MAX_FILE_BYTES = 64 << 20  # the largest MNIST file (training images) is 47 MB
_EXPECTED = ("the MNIST files " + ", ".join(FILES) + " (plain or .gz; from "
             "https://ossci-datasets.s3.amazonaws.com/mnist/ or another MNIST mirror)")
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049  # IDX: ubyte data, 3 resp. 1 dimensions


def _names(base: str) -> list[str]:
    dotted = base.replace("-idx", ".idx")
    return [base, base + ".gz", dotted, dotted + ".gz"]


def find_dir(data_dir: str | None) -> Path:
    """The folder holding the MNIST files (see module doc), or a DataError."""
    root = data_root(NAME, data_dir, _EXPECTED)
    for d in (root, root / "mnist", root / "MNIST" / "raw"):
        if any((d / n).is_file() for n in _names(FILES[0])):
            return d
    return root  # read_idx then names the first missing file


def read_idx(folder: Path, base: str, magic: int) -> np.ndarray:
    """The array stored in IDX file ``base`` (any accepted name) with the given magic."""
    path = next((folder / n for n in _names(base) if (folder / n).is_file()), None)
    if path is None:
        raise DataError(f"MNIST file {base} (or {base}.gz) not found in {str(folder)!r}; "
                        f"expected {_EXPECTED}")
    from ..userfiles import read_bytes

    raw = read_bytes(path, "MNIST file", MAX_FILE_BYTES, f"re-download {_EXPECTED}")
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the name says
        try:  # at most MAX_FILE_BYTES out: a small "gzip bomb" must not fill the memory
            z = zlib.decompressobj(16 + zlib.MAX_WBITS)
            raw = z.decompress(raw, MAX_FILE_BYTES + 1)
        except zlib.error as e:
            raise DataError(f"MNIST file {str(path)!r} is a corrupt gzip file ({e}); "
                            f"re-download {_EXPECTED}") from None
        if len(raw) > MAX_FILE_BYTES:
            raise DataError(f"MNIST file {str(path)!r} decompresses to more than "
                            f"{MAX_FILE_BYTES >> 20} MB (the largest, the training images, "
                            f"is 47 MB); re-download {_EXPECTED}")
    ndim = 3 if magic == _IMAGES_MAGIC else 1
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        raise DataError(f"MNIST file {str(path)!r} has magic number {found}, expected {magic} "
                        f"(IDX {'images' if ndim == 3 else 'labels'}); re-download {_EXPECTED}")
    header = 4 + 4 * ndim
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + math.prod(dims) or (ndim == 3 and dims[1:] != [28, 28]):
        raise DataError(f"MNIST file {str(path)!r} is truncated or malformed (dimensions "
                        f"{dims}, {len(raw) - header} data bytes); re-download {_EXPECTED}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _pair(folder: Path, images: str, labels: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = read_idx(folder, images, _IMAGES_MAGIC)
    y = read_idx(folder, labels, _LABELS_MAGIC)
    if len(x) != len(y) or (len(y) and y.max() > 9):
        raise DataError(f"MNIST files {images} and {labels} in {str(folder)!r} do not match "
                        f"({len(x)} images, {len(y)} labels, labels up to {y.max(initial=0)}); "
                        f"re-download {_EXPECTED}")
    xt = (torch.from_numpy(x.copy()).float().div_(255.0) - MEAN) / STD
    return xt.unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def load(data_dir: str | None) -> Dataset:
    """The whole MNIST data set, normalised (see module doc)."""
    folder = find_dir(data_dir)
    x_train, y_train = _pair(folder, FILES[0], FILES[1])
    x_test, y_test = _pair(folder, FILES[2], FILES[3])
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10)


def build(opts: dict[str, Any], data_dir: str | None, seed: int) -> TaskSpec:
    """The MNIST task; ``n_train`` / ``n_test`` subsample with ``seed`` for quick runs."""
    o = check_options(NAME, opts, OPTIONS)
    model = check_choice(NAME, "model", o["model"], MODELS)
    n_train = check_int(NAME, "n_train", o["n_train"], 0)
    n_test = check_int(NAME, "n_test", o["n_test"], 0)
    kw = {"hidden": check_hidden(NAME, o["hidden"])} if model == "mlp" else {}
    d = load(data_dir)
    x_train, y_train = subsample(d.x_train, d.y_train, n_train, seed, NAME, "n_train")
    x_test, y_test = subsample(d.x_test, d.y_test, n_test, seed + 1, NAME, "n_test")
    return TaskSpec(name=NAME, data=Dataset(x_train, y_train, x_test, y_test, 10),
                    model_fn=model_factory(model, (1, 28, 28), 10, **kw),
                    loss_fn=F.cross_entropy, metric="accuracy", batching=batching_for(model))
