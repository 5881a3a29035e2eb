"""Checkpoints: when they are taken, what they hold, how they are written and read back.

Schedule (``checkpoint_every`` in a config, ``--checkpoint-every`` on the command line): an
integer is a number of local steps per worker (deterministic: in the simulator a run
resumed from such a checkpoint equals, bit for bit, the run never interrupted with the same
schedule); ``"<x>min"`` is wall-clock minutes (the checkpoints then fall wherever the
machine's speed puts them; each one is still complete and exact to resume from). Every
run that writes a folder also checkpoints when it is stopped by Ctrl-C or SIGTERM.

A checkpoint is one file, ``torch.save`` of plain data (tensors, numbers, strings, lists,
tuples, dicts), read with ``torch.load(weights_only=True)``: no pickled code runs. It is
written to a temporary name and renamed (:func:`relaxsgd.outputs.atomic_write`), so a
kill at any moment leaves the previous checkpoint or the new one. Its top level::

    {"format": "relaxsgd.checkpoint/1", "runtime": "sim" | "dist",
     "config": {...},        # the resolved config of the run (config.yaml)
     "position": float,      # where the workers stopped (local steps)
     "virtual_time": float,  # simulator: the engine's clock
     "bank": {...},          # parameters, optimizer state, samplers, generators (bank_state)
     "workers": [{...}],     # per worker: w.state, its generator, counters (worker_state)
     "engine": {...},        # simulator: links, in-flight bookkeeping, traffic, generators
     "run": {...}}           # metrics rows so far, evaluation schedule, wall time

A file that is truncated, not a checkpoint, from another version or of another run is
refused with one line (:class:`relaxsgd.errors.ConfigError`).
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .checks import require_float, require_int
from .errors import ConfigError
from .outputs import atomic_write
from .state_tree import decode, encode

FORMAT = "relaxsgd.checkpoint/1"
FILE = "checkpoint.pt"
_MINUTES = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*min\s*$", re.IGNORECASE)


def parse_every(value: Any) -> tuple[str, float] | None:
    """``checkpoint_every`` as ("steps", k) or ("minutes", m); None when it is unset."""
    if value is None:
        return None
    what = "checkpoint_every (local steps per worker, or minutes as '10min')"
    if isinstance(value, str):
        m = _MINUTES.match(value)
        if m:
            return "minutes", require_float(float(m.group(1)), what, above=0)
        if value.strip().isdigit():
            value = int(value.strip())
        else:
            raise ConfigError(f"{what} must be a whole number of steps or '<x>min', "
                              f"got {value!r}")
    return "steps", float(require_int(value, what, at_least=1))


def next_position(period: float, pos: float) -> float:
    """The next checkpoint of a schedule every ``period`` local steps, for workers whose
    latest safe point is at ``pos``: the first multiple of ``period`` past it (positions
    can jump several multiples, e.g. with SwarmSGD's geometric local steps)."""
    return (math.floor(pos / period) + 1) * period


# What restoring a checkpoint that torch read but whose content is wrong (a value of the
# wrong type or shape, a missing key) raises: both runtimes turn these into one line.
RESTORE_ERRORS = (ConfigError, KeyError, ValueError, TypeError, IndexError, RuntimeError,
                  AttributeError)


# -- state of the pieces ------------------------------------------------------------------

def bank_state(bank: Any) -> dict[str, Any]:
    """Everything of a :class:`relaxsgd.bank.Bank` that training changes."""
    return {"X": bank.X.detach().cpu().clone(), "M": bank.M.detach().cpu().clone(),
            "V": bank.V.detach().cpu().clone(), "steps": list(bank.steps),
            "samples": list(bank.samples),
            "samplers": [s.state_dict() for s in bank.samplers],
            "aug_gens": [g.get_state() for g in bank.aug_gens],
            "loss_sum": bank.loss_sum.clone(), "loss_count": list(bank.loss_count),
            "buffers": [{k: b.detach().cpu().clone() for k, b in bank.buffers_of(k).items()}
                        for k in range(len(bank.ranks))]}


def load_bank_state(bank: Any, s: dict[str, Any]) -> None:
    """Write :func:`bank_state` back into a bank built for the same run (in place, so
    the per-worker views stay bound)."""
    for key in ("X", "M", "V"):
        t = getattr(bank, key)
        if not isinstance(s[key], torch.Tensor) or s[key].dtype != t.dtype:
            got = getattr(s[key], "dtype", None) or type(s[key]).__name__
            raise ConfigError(f"the checkpoint's {key} is a {got}, not a {t.dtype} tensor: "
                              "a damaged or edited checkpoint")
        if tuple(s[key].shape) != tuple(t.shape):
            raise ConfigError(f"the checkpoint's {key} has shape {tuple(s[key].shape)}, this "
                              f"run's {tuple(t.shape)}: it belongs to another model or run")
    with torch.no_grad():
        bank.X.copy_(s["X"])
        bank.M.copy_(s["M"])
        if bank.V.numel():
            bank.V.copy_(s["V"])
        for k, bufs in enumerate(s["buffers"]):
            own = bank.buffers_of(k)
            for name, b in bufs.items():
                own[name].copy_(b)
    bank.steps[:] = [int(x) for x in s["steps"]]
    bank.samples[:] = [int(x) for x in s["samples"]]
    for sampler, st in zip(bank.samplers, s["samplers"], strict=True):
        sampler.load_state_dict(st)
    for g, st in zip(bank.aug_gens, s["aug_gens"], strict=True):
        g.set_state(st)
    bank.loss_sum.copy_(s["loss_sum"])
    bank.loss_count[:] = [int(x) for x in s["loss_count"]]


def worker_state(w: Any) -> dict[str, Any]:
    """A worker's algorithm state, its generator and its counters."""
    return {"state": encode(w.state, f"worker {w.rank}'s state"), "rng": w.rng.get_state(),
            "counters": dict(w.counters), "obs_sum": dict(w.obs_sum),
            "obs_count": dict(w.obs_count), "samples": w.samples}


def load_worker_state(w: Any, s: dict[str, Any], make_handle: Callable[[Any], Any]) -> None:
    w.state.clear()
    w.state.update(decode(s["state"], make_handle, device=w.params.device))
    w.rng.set_state(s["rng"])
    w.counters, w.obs_sum = dict(s["counters"]), dict(s["obs_sum"])
    w.obs_count, w.samples = dict(s["obs_count"]), s["samples"]


# -- the file -----------------------------------------------------------------------------

def save(path: str, payload: dict[str, Any]) -> None:
    """Write a checkpoint atomically (``payload`` gets the format tag)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buf)
    atomic_write(path, buf.getvalue())


def load(path: str, runtime: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a checkpoint; ConfigError (one line) if it is missing, damaged or foreign.

    ``config``: the resolved config of the run it must belong to (compared key by key,
    except the fields that do not change what is computed)."""
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path!r}: the run never reached one (give "
                          "--checkpoint-every, or stop it with Ctrl-C, to make one)")
    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol: not ours
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is the same answer
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ConfigError(f"checkpoint {path!r} cannot be read (truncated, damaged or not a "
                          f"relaxsgd checkpoint): {why}") from None
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise ConfigError(f"{path!r} is not a relaxsgd checkpoint of format {FORMAT} "
                          f"(found {got!r})")
    if ck.get("runtime") != runtime:
        raise ConfigError(f"checkpoint {path!r} was written by the {ck.get('runtime')!r} "
                          f"runtime; resume it with --runtime {ck.get('runtime')}")
    if config is not None:
        diff = config_difference(ck.get("config"), config)
        if diff:
            raise ConfigError(f"checkpoint {path!r} belongs to another run: {diff}")
    return ck


# fields that do not change what a run computes, so a resume may differ in them
_FREE = {"out", "threads", "steps_per_worker", "data_dir"}


def config_difference(saved: Any, current: dict[str, Any]) -> str:
    """'' if the two resolved configs describe the same run, else the first difference."""
    if not isinstance(saved, dict):
        return "it holds no config"
    for k in sorted(set(saved) | set(current)):
        if k in _FREE:
            continue
        a, b = saved.get(k), current.get(k)
        if _norm(a) != _norm(b):
            return f"{k} is {a!r} there and {b!r} here"
    return ""


def _norm(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, float) and math.isfinite(v) and v == int(v):
        return int(v)
    return v
