"""The distributed runtime: every algorithm on torch.distributed, one worker per process.

- ``relaxsgd run --runtime dist`` under ``torchrun`` (or ``python -m relaxsgd.distributed.launch``):
  :func:`relaxsgd.distributed.runtime.run_dist`;
- the drop-in wrapper for your own training loop: :func:`init`, :func:`wrap`
  (:mod:`relaxsgd.distributed.wrapper`).

See docs/distributed.md. Importing this package starts nothing (no threads, no groups).
"""

from __future__ import annotations

from typing import Any

__all__ = ["init", "wrap", "Relaxed"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import wrapper

        return getattr(wrapper, name)
    raise AttributeError(f"module 'relaxsgd.distributed' has no attribute {name!r}")
