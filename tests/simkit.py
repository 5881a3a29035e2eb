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
