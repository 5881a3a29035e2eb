"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread: stable timings on a shared 2-core machine, identical floats."""
    torch.set_num_threads(1)
