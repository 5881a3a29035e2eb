"""Where tensors live: the device a worker runs on, random draws that do not depend on it,
and moving state between devices.

Rules the whole package follows (``tests/test_devices.py`` checks them on a CPU-only
machine):

- Every tensor is made on the device of the data it belongs to: ``x.new_zeros(n)``,
  ``torch.zeros_like(x)``, or ``torch.zeros(n, device=x.device)``. A factory without
  ``device=`` would land on the default device (the CPU), and mixing it with a worker's
  CUDA tensors raises "Expected all tensors to be on the same device".
- Random draws: every ``torch.Generator`` of the package lives on the CPU (it is plain
  state that checkpoints save and that the seed fully determines). :func:`draw` makes the
  numbers on the generator's device and copies them once to the device where they are
  used. So a seed gives the SAME random numbers on the CPU and on CUDA (CUDA's Philox
  generator would give different ones), and a run's random choices (which entries random-k
  keeps, QSGD's and the lattice's rounding, gossip partners) do not depend on the device.
  What can still differ between CPU and CUDA is float rounding in the math itself
  (reductions and matrix products sum in a different order), not the draws.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError


def generator_device(generator: torch.Generator | None) -> torch.device:
    """The device a generator draws on (the CPU for None: torch's global generator)."""
    return generator.device if generator is not None else torch.device("cpu")


def draw(fn: Callable[..., Tensor], *args: Any, generator: torch.Generator | None,
         device: torch.device | str | None, **kwargs: Any) -> Tensor:
    """``fn(*args, generator=generator, **kwargs)`` (``torch.rand``, ``randn``, ``randint``,
    ``randperm``) made on the generator's device, then copied to ``device``, where the
    numbers are used (None: torch's default device, like a factory without ``device=``).
    The numbers depend on the generator's state only, not on ``device``."""
    t = fn(*args, generator=generator, device=generator_device(generator), **kwargs)
    if device is None:  # resolved by a factory, so that tests/devicekit.py sees it
        device = torch.empty(0, device=device).device
    return t.to(device)


def map_tensors(tree: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``tree`` (dicts, lists, tuples, named tuples, dataclasses such as the compressors'
    payloads) with ``fn`` applied to every tensor; other leaves (generators, numbers) as
    they are. Containers are rebuilt, tensors are whatever ``fn`` returns."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: map_tensors(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [map_tensors(v, fn) for v in tree]
    if isinstance(tree, tuple):
        items = [map_tensors(v, fn) for v in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return dataclasses.replace(tree, **{f.name: map_tensors(getattr(tree, f.name), fn)
                                            for f in dataclasses.fields(tree) if f.init})
    return tree


def move(tree: Any, device: torch.device | str) -> Any:
    """A copy of a nested state or payload with every tensor on ``device`` (a tensor
    already there is not copied). Used where tensors arrive on the CPU: a checkpoint read
    with ``map_location="cpu"``, a message decoded from the wire."""
    return map_tensors(tree, lambda t: t.to(device))


def to_host_tree(tree: Any) -> Any:
    """``tree`` with every tensor on the CPU (:func:`to_host`), for the wire."""
    return map_tensors(tree, to_host)


def to_host(t: Tensor) -> Tensor:
    """``t`` on the CPU, for encoding on the wire: through pinned (page-locked) memory when
    ``t`` is on CUDA, so the copy is one DMA transfer; a CPU tensor is returned as is."""
    if t.device.type == "cpu":
        return t
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
        host.copy_(t)
        return host
    return t.to("cpu")


def pick_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """The device of one worker process.

    ``requested``: ``None``/``"auto"`` (CUDA when present, else the CPU), ``"cpu"``,
    ``"cuda"`` (the GPU that ``local_rank`` picks) or ``"cuda:k"`` (that GPU). With more
    local ranks than GPUs, ranks share the GPUs round-robin (``local_rank % count``): see
    docs/distributed.md for why, and :func:`shares_gpu` for the backend that follows.
    A request this machine cannot serve is a :class:`ConfigError` naming what would work.
    """
    req = "auto" if requested is None else str(requested).strip().lower()
    if req == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if req == "auto":
        if count == 0:
            return torch.device("cpu")
        req = "cuda"
    if req == "cuda" or req.startswith("cuda:"):
        if count == 0:
            raise ConfigError(f"device {requested!r} asked for but torch sees no CUDA device "
                              "on this machine; use --device cpu (or auto)")
        if req == "cuda":
            return torch.device("cuda", (local_rank or 0) % count)
        index = req[5:]
        if not index.isdigit() or int(index) >= count:
            raise ConfigError(f"device {requested!r}: this machine has {count} GPU(s); "
                              f"use cuda:0 .. cuda:{count - 1}, cuda or auto")
        return torch.device("cuda", int(index))
    raise ConfigError(f"device {requested!r} is unknown; use auto, cpu, cuda or cuda:k")


def shares_gpu(local_world_size: int) -> bool:
    """True when this node runs more ranks than it has GPUs, so that some GPU serves two
    ranks: NCCL refuses that (one communicator per device), so the runtime uses gloo."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return 0 < count < local_world_size


DEVICES = ("auto", "cpu", "cuda", "cuda:K")
_CUDA = re.compile(r"cuda(?::(\d{1,4}))?")


def check_device(spec: str) -> None:
    """ConfigError unless ``spec`` is spelt as a device choice (availability not checked:
    a config written on one machine is read on another)."""
    if not isinstance(spec, str) or not (spec in ("auto", "cpu") or _CUDA.fullmatch(spec)):
        raise ConfigError(f"unknown device {spec!r}; choose one of: {', '.join(DEVICES)} "
                          "(e.g. --device cuda:0)")


def resolve_device(spec: str) -> torch.device:
    """The simulator's device on this machine (``auto``: the first GPU when CUDA is
    present, else the CPU): :func:`pick_device` for a single process."""
    check_device(spec)
    return pick_device(spec, None)
