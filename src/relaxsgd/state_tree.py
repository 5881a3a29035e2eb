"""Algorithm state as plain data: what a checkpoint can hold and read back without pickle.

A worker's ``w.state`` (and any message still in an inbox) is a tree of tensors, numbers,
strings, lists, tuples and dicts, with a few richer leaves: ``torch.Generator`` objects,
finished communication handles, named tuples of an algorithm (``Pending``, ``Delivered``)
and the payload dataclasses of the wire format. :func:`encode` turns such a tree into one
that ``torch.load(weights_only=True)`` accepts (tensors, numbers, str, None, bool, lists,
tuples, dicts); :func:`decode` turns it back. Richer leaves become tagged dicts
``{KIND: name, ...}``; the named tuple and dataclass types they name must be on an
allow-list (:func:`register_state_type`, or the wire format's payload list), so a file
cannot make the decoder build an arbitrary class.

A handle still in flight cannot be saved (its result does not exist yet): :func:`encode`
raises :class:`UnsettledState` naming where it is, and :func:`pending_handles` lists such
handles so that a runtime can wait for them before it saves (the checkpoint rule of
:class:`relaxsgd.algorithms.base.Checkpoint`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

KIND = "__relaxsgd_kind__"
_types: dict[str, type] = {}


class UnsettledState(RuntimeError):
    """The state holds a handle whose result is still in flight, or an unknown object."""


def register_state_type(cls: type) -> type:
    """Allow a named tuple or dataclass in saved state; usable as a class decorator."""
    if not (dataclasses.is_dataclass(cls) or _is_namedtuple_type(cls)):
        raise TypeError(f"{cls!r} is neither a dataclass nor a named tuple")
    name = f"{cls.__module__}.{cls.__qualname__}"
    if _types.get(name, cls) is not cls:
        raise ValueError(f"state type {name!r} is registered twice")
    _types[name] = cls
    return cls


def _is_namedtuple_type(cls: Any) -> bool:
    return isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields")


def _is_handle(obj: Any) -> bool:
    from .algorithms.base import Handle  # (imported late: algorithms import this module)

    return isinstance(obj, Handle)  # both runtimes' handles (DHandle is a Handle)


def _handle_done(h: Any) -> bool:
    return bool(h.done)


def _handle_value(h: Any) -> Any:
    return h.result() if hasattr(h, "result") else h.value


def pending_handles(tree: Any) -> list[Any]:
    """The handles in ``tree`` whose result has not arrived yet, in a fixed order."""
    return [x for x in _walk(tree) if _is_handle(x) and not _handle_done(x)]


def _walk(obj: Any, depth: int = 0) -> Iterator[Any]:
    if depth > 64:
        return
    yield obj
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _walk(getattr(obj, f.name), depth + 1)
    elif _is_handle(obj) and _handle_done(obj):
        yield from _walk(_handle_value(obj), depth + 1)


def _type_name(obj: Any) -> str:
    cls = type(obj)
    name = f"{cls.__module__}.{cls.__qualname__}"
    if _types.get(name) is cls:
        return name
    from .distributed import wire  # its payload dataclasses are allowed too

    try:
        if wire._payload_class(cls.__name__) is cls:
            return "wire:" + cls.__name__
    except wire.WireError:
        pass
    raise UnsettledState(f"cannot save a {name} in algorithm state: register it with "
                         "relaxsgd.state_tree.register_state_type")


def encode(obj: Any, where: str = "state") -> Any:
    """``obj`` as a tree of tensors, numbers, str, None, lists, tuples and dicts."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, torch.Generator):
        return {KIND: "generator", "state": obj.get_state()}
    if isinstance(obj, (torch.Size, torch.dtype)):
        return {KIND: "size", "dims": list(obj)} if isinstance(obj, torch.Size) \
            else {KIND: "dtype", "name": str(obj).removeprefix("torch.")}
    if _is_handle(obj):
        if not _handle_done(obj):
            raise UnsettledState(f"{where} holds a handle still in flight ({obj!r}); a "
                                 "runtime waits for such handles before it saves")
        return {KIND: "handle", "value": encode(_handle_value(obj), where + ".value")}
    if isinstance(obj, dict):
        return {KIND: "dict", "items": [(encode(k, where), encode(v, f"{where}[{k!r}]"))
                                        for k, v in obj.items()]}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return {KIND: "type", "name": _type_name(obj),
                "fields": {f: encode(getattr(obj, f), f"{where}.{f}") for f in obj._fields}}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {KIND: "type", "name": _type_name(obj),
                "fields": {f.name: encode(getattr(obj, f.name), f"{where}.{f.name}")
                           for f in dataclasses.fields(obj)}}
    if isinstance(obj, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(encode(v, f"{where}[{i}]") for i, v in enumerate(obj))
    from collections import deque

    if isinstance(obj, deque):
        return {KIND: "deque", "items": [encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
    raise UnsettledState(f"cannot save {where}: a {type(obj).__name__} is not plain data "
                         "(tensors, numbers, str, lists, tuples, dicts, generators, "
                         "registered named tuples or dataclasses)")


def decode(obj: Any, make_handle: Callable[[Any], Any], device: Any = None) -> Any:
    """The tree :func:`encode` made, back as objects; ``make_handle(value)`` builds a
    finished handle of the runtime that reads it; tensors go to ``device`` (the worker's:
    checkpoints are read onto the CPU), generator states stay where torch keeps them.
    Raises ValueError on a malformed tree."""
    def again(v: Any) -> Any:
        return decode(v, make_handle, device)

    if isinstance(obj, Tensor):
        return obj if device is None else obj.to(device)
    if isinstance(obj, list):
        return [again(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(again(v) for v in obj)
    if not isinstance(obj, dict):
        if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
            return obj
        raise ValueError(f"unexpected {type(obj).__name__} in saved state")
    kind = obj.get(KIND)
    if kind == "dict":
        return {again(k): again(v) for k, v in obj["items"]}
    if kind == "generator":
        g = torch.Generator()
        g.set_state(obj["state"])
        return g
    if kind == "handle":
        return make_handle(again(obj["value"]))
    if kind == "deque":
        from collections import deque

        return deque(again(v) for v in obj["items"])
    if kind == "size":
        return torch.Size(int(x) for x in obj["dims"])
    if kind == "dtype":
        dt = getattr(torch, str(obj["name"]), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown dtype {obj['name']!r} in saved state")
        return dt
    if kind == "type":
        cls = _lookup(str(obj["name"]))
        fields = {k: again(v) for k, v in obj["fields"].items()}
        return cls(**fields)
    raise ValueError(f"unknown entry kind {kind!r} in saved state")


def _lookup(name: str) -> type:
    if name.startswith("wire:"):
        from .distributed import wire

        try:
            return wire._payload_class(name[5:])
        except wire.WireError as e:
            raise ValueError(str(e)) from None
    if name not in _types and name.startswith("relaxsgd."):
        # the registering module (one of ours: import-safe) may not be imported yet
        import importlib

        mod = name.rsplit(".", 1)[0]
        while mod and name not in _types:
            try:
                importlib.import_module(mod)
            except ImportError:
                pass
            mod = mod.rsplit(".", 1)[0] if "." in mod else ""
    if name not in _types:
        raise ValueError(f"saved state names type {name!r}, which is not allowed in state")
    return _types[name]
