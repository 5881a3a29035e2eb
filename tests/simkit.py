"""Small, fast, deterministic run configurations for tests."""

from __future__ import annotations

from typing import Any

from relaxsgd.config import RunConfig, from_dict

# Deterministic, quick: a fixed virtual step time and a small synthetic task.
TINY = {
    "task": "logreg",
    "task_options": {"n_train": 512, "n_test": 256, "dim": 8, "classes": 4},
    "workers": 4,
    "steps": 12,
    "evals": 3,
    "compute": {"step_time_s": 0.01},
    "train": {"batch_size": 8, "lr": 0.1},
}


def tiny(**over: Any) -> RunConfig:
    """TINY with some keys replaced (dict values are merged one level deep)."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    return from_dict(d)


def fake_cifar(parent: Any, per_batch: int = 4) -> Any:
    """A CIFAR-10 folder (five training batches and a test batch of ``per_batch`` random
    images each, in the python-pickle layout the task reads) under ``parent``."""
    import pickle
    from pathlib import Path

    import numpy as np

    folder = Path(parent) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        d = {b"data": rng.integers(0, 256, (per_batch, 3072)).astype(np.uint8),
             b"labels": [(i + j) % 10 for j in range(per_batch)]}
        with (folder / name).open("wb") as f:
            pickle.dump(d, f)
    return folder
