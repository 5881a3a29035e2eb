"""The YAML reader of configs, ``--set`` values and profile files.

Two things differ from ``yaml.safe_load``:

- Numbers are read as a person writes them. PyYAML implements YAML 1.1, where a float
  needs a dot, so ``1e8``, ``1e-3`` and ``1e-300`` are strings there (and were refused as
  "must be a number"); here they are floats, as in YAML 1.2 and JSON. Integers, booleans
  and everything else are read as before.
- Aliases cannot blow up. An alias is a reference, so nine levels of ``[*a, *a, ...]``
  (the "billion laughs") are a few hundred bytes of text that stand for 10^9 values: cheap
  to parse, but anything that walks them (a copy, a repr in an error line, writing the
  resolved config) takes minutes and gigabytes. The document's size with every alias
  expanded is counted on the parsed node graph, before any Python object is made, and a
  document of more than :data:`MAX_NODES` values, nested deeper than :data:`MAX_DEPTH`,
  or with an alias inside itself, is refused at once.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import ConfigError

MAX_NODES = 100_000  # values in a document, aliases expanded (a run's config.yaml: ~100)
MAX_DEPTH = 64  # nesting of lists and mappings (a config's: 3)

# YAML 1.2's float, without the 1.1 requirement of a dot: 1e8, -1E-3, .5e3 (an integer
# without exponent still resolves as int: the int resolver is tried first)
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)$")


class _TooBig(Exception):
    pass


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (its own copy of the resolver table) and a bound on
    nesting, checked as the document is composed (PyYAML's composer recurses: 5,000
    levels took 4 s to end in a RecursionError)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH + 1:
                raise _TooBig(f"it is nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2,
                              list("-+0123456789."))


class _Duplicate(Exception):
    def __str__(self) -> str:
        return repr(self.args[0])


def _no_duplicate_keys(node: yaml.MappingNode) -> None:
    """_Duplicate for a key written twice in one mapping (YAML forbids it; PyYAML keeps
    the last one without a word, so ``task: logreg`` then ``task: mnist`` ran mnist)."""
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            if key.value in seen:
                raise _Duplicate(key.value, f"{seen[key.value]} and {key.start_mark.line + 1}")
            seen[key.value] = key.start_mark.line + 1


def _expanded_size(node: yaml.Node, memo: dict[int, int], busy: set[int],
                   depth: int) -> int:
    """Values in ``node`` with every alias expanded (memoised: shared nodes count each
    time they are used, but are walked once); _TooBig past the bounds."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in busy:
        raise _TooBig("an alias refers to the value that holds it (a cycle)")
    if depth > MAX_DEPTH:
        raise _TooBig(f"it is nested more than {MAX_DEPTH} levels deep")
    size = 1
    if isinstance(node, yaml.MappingNode):
        _no_duplicate_keys(node)
    if isinstance(node, (yaml.SequenceNode, yaml.MappingNode)):
        busy.add(key)
        children = (node.value if isinstance(node, yaml.SequenceNode)
                    else [n for pair in node.value for n in pair])
        for child in children:
            size += _expanded_size(child, memo, busy, depth + 1)
            if size > MAX_NODES:
                raise _TooBig(f"it holds more than {MAX_NODES:,} values once its aliases "
                              "are expanded")
        busy.discard(key)
    memo[key] = size
    return size


def load_yaml_text(text: str, what: str) -> Any:
    """The value of one YAML document ``text`` (see the module doc); ConfigError with
    ``what`` (e.g. "config file 'a.yaml'") for invalid or oversized YAML."""
    loader = None
    try:
        loader = _Loader(text)  # its reader refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), 0)
        return loader.construct_document(node)
    except _TooBig as e:
        raise ConfigError(f"{what} is refused: {e}; write the values out") from None
    except RecursionError:
        raise ConfigError(f"{what} is refused: it is nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise ConfigError(f"{what} is not valid YAML{where}"
                          f"{f' ({problem})' if problem else ''}") from None
    except _Duplicate as e:
        raise ConfigError(f"{what} gives the key {e} twice (at lines {e.args[1]}); give "
                          "each key once") from None
    finally:
        if loader is not None:
            loader.dispose()
