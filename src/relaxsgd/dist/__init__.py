"""Deprecated alias of :mod:`relaxsgd.distributed` (the runtime package's name until 0.1).

``import relaxsgd.dist``, ``from relaxsgd.dist.wire import ...`` and
``python -m relaxsgd.dist.launch`` keep working for one release, with a
:class:`DeprecationWarning`; every name is the same object as in
:mod:`relaxsgd.distributed`, so an ``isinstance`` check or a registry entry holds across
both. Remove this package in the release after next.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

_NEW = "relaxsgd.distributed"
_OLD = __name__

warnings.warn("relaxsgd.dist is renamed relaxsgd.distributed; the old name goes in the "
              "next release", DeprecationWarning, stacklevel=2)


class _AliasLoader(importlib.abc.Loader):
    """Loads ``relaxsgd.dist.X`` as the already imported ``relaxsgd.distributed.X``."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: Any) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        pass  # the real module ran when it was imported under its own name

    def get_code(self, fullname: str) -> Any:
        """For ``python -m relaxsgd.dist.X``: the code of ``relaxsgd.distributed.X``."""
        spec = importlib.util.find_spec(self.target)
        return spec.loader.get_code(self.target)  # type: ignore[union-attr]


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Maps every ``relaxsgd.dist.X`` to ``relaxsgd.distributed.X`` (one module, two names)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if not fullname.startswith(_OLD + "."):
            return None
        real = _NEW + fullname[len(_OLD):]
        if importlib.util.find_spec(real) is None:
            return None
        spec = importlib.util.spec_from_loader(fullname, _AliasLoader(real))
        return spec


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())

_real = importlib.import_module(_NEW)
__all__ = list(_real.__all__)
__path__: list[str] = []  # a package, so that its submodules are found through the finder


def __getattr__(name: str) -> Any:
    return getattr(_real, name)
