"""A CPU-only check that code makes its tensors on the device of the data they belong to.

On a machine without a GPU the workers' tensors and the default device are both the CPU,
so a tensor made on the default device by accident (``torch.zeros(n)`` where
``x.new_zeros(n)`` was meant) works here and crashes on CUDA with "Expected all tensors to
be on the same device". :class:`StrictDevices` makes the mistake visible on the CPU:

- every tensor factory (``torch.zeros``, ``rand``, ``tensor``, ``arange``, ... the set
  torch's own default-device context rewrites) called from relaxsgd's code WITHOUT a
  ``device=`` makes its tensor on the ``meta`` device, as if the default device were not
  the workers' one;
- every torch operation that mixes a meta tensor with a real one raises. torch itself
  raises for most operations (``cpu + meta``), but not for all: in torch 2.13 indexing
  assignment, ``@``, ``mul_`` by a 0-dim tensor, ``add_(.., alpha=)`` and draws with a CPU
  generator accept meta silently, so the mode checks every call itself;
- reading a meta tensor's value (``float``, ``item``) raises (torch's own error).

Factories called from torch's own code (an optimizer's step counter, ``nn.Linear``'s
weights) keep the default device: only relaxsgd's code is under test.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._pytree import tree_flatten

import relaxsgd

_SRC = os.path.dirname(os.path.abspath(relaxsgd.__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_DISPATCH = (_TORCH + "overrides.py", _TORCH + "utils" + os.sep + "_device.py")
_HERE = os.path.abspath(__file__)
_FACTORIES = _device_constructors()


class DeviceMixError(RuntimeError):
    """An operation mixed a tensor made without ``device=`` with the workers' tensors."""


def _caller_file() -> str:
    """The file of the code that called the torch function (torch's mode dispatch and this
    module skipped): a factory that ``nn.Linear`` calls is torch's, not relaxsgd's."""
    f = sys._getframe(2)
    while f is not None:
        name = os.path.abspath(f.f_code.co_filename)
        if name != _HERE and not name.startswith(_DISPATCH):
            return name
        f = f.f_back
    return ""


class StrictDevices(TorchFunctionMode):
    """The mode described in the module docstring; ``with StrictDevices(): ...``."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None \
                and _caller_file().startswith(_SRC):
            kwargs["device"] = "meta"
        else:
            leaves, _ = tree_flatten((args, kwargs))
            kinds = {t.device.type for t in leaves if isinstance(t, torch.Tensor)}
            if "meta" in kinds and len(kinds) > 1:
                raise DeviceMixError(
                    f"{getattr(func, '__name__', func)} mixes a tensor made without device= "
                    f"(on the default device) with tensors on {sorted(kinds - {'meta'})}; "
                    f"called from {_caller_file()}")
        return func(*args, **kwargs)


def drive(program: Any, n: int = 1) -> Any:
    """Run a compressor's ``mean`` sub-program as the only worker of ``n`` identical ones:
    an all-reduce gives back the (mean of ``n`` equal) tensors, an all-gather ``n`` copies
    of the payload. Returns the program's return value."""
    from relaxsgd.algorithms.base import AllGather, AllReduce

    value = None
    try:
        while True:
            eff = program.send(value)
            if isinstance(eff, AllReduce):
                ts = eff.tensors
                value = [t.clone() for t in ts] if isinstance(ts, list) else ts.clone()
            elif isinstance(eff, AllGather):
                value = [eff.payload] * n
            else:
                raise AssertionError(f"unexpected effect {eff!r}")
    except StopIteration as stop:
        return stop.value


def cuda_or_skip() -> None:
    """Skip the calling test, with the reason, when torch sees no CUDA device."""
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch.cuda.is_available() is False here)")
