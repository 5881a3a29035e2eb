"""Name -> plug-in tables, imported lazily so that `import relaxsgd` stays cheap.

Every plug-in kind has one :class:`Registry`; a plug-in is one file plus one line
``REG.add("name", "relaxsgd.pkg.module:attr", "one-line description")`` in its
package's ``__init__``. Unknown names raise :class:`ConfigError` listing every choice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    target: str  # "module:attribute"
    description: str


class Registry:
    """A lazily-importing table of plug-ins of one kind (algorithm, task, compressor, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, target: str, description: str) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = Entry(name, target, description)

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self._entries)}")
        return self._entries[name]

    def module(self, name: str) -> Any:
        """The module that defines ``name`` (for its OPTIONS, DESCRIPTION, ...)."""
        return importlib.import_module(self.entry(name).target.partition(":")[0])

    def get(self, name: str) -> Any:
        """The registered object (class, function or value) for ``name``."""
        module, _, attr = self.entry(name).target.partition(":")
        return getattr(importlib.import_module(module), attr)
