"""Safe output folders: atomic writes, strict JSON, the final models, interrupt shielding.

Every file relaxsgd writes into a run's folder goes through :func:`atomic_write` (or a
helper built on it): the bytes go to a temporary name in the same folder, are flushed to
disk, and the temporary file is renamed over the final name, so a reader (or a crash, a
second Ctrl-C, a SIGKILL) only ever sees the old file or the new one, never half of one.
``metrics.csv`` is the one exception: it is appended row by row as the run goes, so that
nothing measured is lost; a half-written last line is possible there after a SIGKILL.

JSON is strict (RFC 8259): NaN and infinities, which Python's ``json`` would write as the
non-standard ``NaN``/``Infinity``, are written as ``null`` and listed under the document's
``"non_finite"`` key (dotted path -> ``"nan"``, ``"inf"`` or ``"-inf"``), so a reader knows
why a figure is missing (the run's ``status``, e.g. ``diverged``, says how it ended).

The final models (``models.pt``) are ``torch.save`` of a plain dict, read back with
``torch.load(path, weights_only=True)`` (no pickled code runs)::

    {"format": "relaxsgd.models/1",
     "ranks": [0, 1, ...],                 # the workers whose models follow, in order
     "param_names": ["net.0.weight", ...], # the parameters, in their flat order
     "X": tensor (n, d),                   # row i: worker ranks[i]'s parameters, flat
     "buffers": [{name: tensor}, ...],     # each worker's buffers (BatchNorm statistics)
     "mean": {name: tensor}}               # the mean model's state_dict: parameters
                                           # averaged over the workers, floating
                                           # buffers averaged too (as it is evaluated)

``spec.model_fn().load_state_dict(models["mean"])`` rebuilds the mean model;
:func:`worker_state` gives worker i's ``state_dict``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import tempfile
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError

MODELS_FORMAT = "relaxsgd.models/1"
# Files a run or a comparison writes: the only ones --force removes from an old folder
# (with the distributed runtime's checkpoint-rank<k>-at<position>.pt, relaxsgd.distributed.saving).
_RANK_CHECKPOINT = re.compile(r"^checkpoint-rank\d+-at[0-9][0-9.e+-]*\.pt$")
OUTPUT_FILES = ("config.yaml", "metrics.csv", "result.json", "models.pt", "checkpoint.pt",
                "summary.txt",
                "report.md", "accuracy_vs_time.png", "accuracy_vs_bytes.png")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)


def atomic_write(path: str, data: bytes | str) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        os.chmod(tmp, _MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves the old file, no litter
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def strict(obj: Any, path: str = "", bad: dict[str, str] | None = None) -> Any:
    """``obj`` with every non-finite float replaced by None; ``bad`` collects their paths."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if bad is not None:
            bad[path] = "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
        return None
    if isinstance(obj, dict):
        return {k: strict(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{path}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def strict_json(obj: Any) -> str:
    """Strict JSON text of ``obj`` (a dict gets a ``non_finite`` key if any were replaced)."""
    bad: dict[str, str] = {}
    clean = strict(obj, "", bad)
    if bad and isinstance(clean, dict):
        clean["non_finite"] = bad
    return json.dumps(clean, indent=2, allow_nan=False, default=_default) + "\n"


def _default(v: Any) -> Any:
    try:  # numpy and torch scalars
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    return x if math.isfinite(x) else None


def write_json(path: str, obj: Any) -> None:
    atomic_write(path, strict_json(obj))


def prepare_out_dir(path: str, force: bool, clean: bool = True) -> str:
    """Check and create the output folder ``path``; ConfigError (one line) if unusable.

    A folder that holds anything is refused unless ``force``; with ``force`` (and
    ``clean``) the files a previous run wrote there (:data:`OUTPUT_FILES`, also in its
    per-algorithm subfolders) are removed first, so old and new results never mix; other
    files are left alone.
    """
    from .runlock import ensure_free

    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {path!r} is a file, not a folder; give a folder path")
    if os.path.isdir(path):
        ensure_free(path)  # a run in progress there: refused before anything is removed
    if os.path.isdir(path) and os.listdir(path):
        if not force:
            held = ", ".join(sorted(os.listdir(path))[:3])
            raise ConfigError(f"output folder {path!r} is not empty (it holds {held}...); "
                              "give a new --out, or add --force to write over it")
        if clean:
            _remove_old_outputs(path)
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".relaxsgd-probe-")  # noqa: SIM115
        probe.close()
    except OSError as e:
        raise ConfigError(f"cannot write to output folder {path!r}: {e.strerror or e}; "
                          "give a folder you can write to with --out") from None
    return path


def discard_refused(path: str) -> None:
    """Remove what a new run wrote into ``path`` before it was refused (``config.yaml``, a
    ``metrics.csv`` of no rows, also in a comparison's per-algorithm folders), and the
    folders left empty, so that the same command, corrected, is accepted there. A folder
    with a ``result.json`` measured something and is kept as it is."""
    if not os.path.isdir(path) or os.path.exists(os.path.join(path, "result.json")):
        return
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name in ("config.yaml", "metrics.csv") and os.path.isfile(full):
            with contextlib.suppress(OSError):
                os.unlink(full)
        elif os.path.isdir(full) and os.path.isfile(os.path.join(full, "config.yaml")):
            discard_refused(full)
    with contextlib.suppress(OSError):
        os.rmdir(path)  # only if empty


def _remove_old_outputs(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if (name in OUTPUT_FILES or _RANK_CHECKPOINT.match(name)) and os.path.isfile(full):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(full)
        elif os.path.isdir(full) and os.path.isfile(os.path.join(full, "config.yaml")):
            from .runlock import ensure_free

            ensure_free(full)
            _remove_old_outputs(full)  # a comparison's per-algorithm folder


# -- final models -------------------------------------------------------------------------

def models_payload(model: Any, X: Any, worker_buffers: list[dict[str, Any]],
                   mean_buffers: dict[str, Any], ranks: list[int]) -> dict[str, Any]:
    """The models file's dict (see the module docstring) from flat parameter rows ``X``."""
    mean = unflatten(model, X.mean(0))
    mean.update({k: v.detach().to("cpu", copy=True) for k, v in mean_buffers.items()})
    return {"format": MODELS_FORMAT, "ranks": [int(r) for r in ranks],
            "param_names": [n for n, _ in model.named_parameters()],
            "X": X.detach().to("cpu", copy=True),
            "buffers": [{k: v.detach().to("cpu", copy=True) for k, v in b.items()}
                        for b in worker_buffers],
            "mean": mean}


def final_models(model: Any, snaps: list[dict[str, Any]]) -> dict[str, Any]:
    """The models dict from the distributed runtime's final snapshots (one per worker:
    ``rank``, flat ``params``, ``buffers``)."""
    import torch

    bufs = [s["buffers"] for s in snaps]
    mean_bufs = {k: torch.stack([b[k] for b in bufs]).mean(0) if v.is_floating_point()
                 else v for k, v in (bufs[0] if bufs else {}).items()}
    return models_payload(model, torch.stack([s["params"] for s in snaps]), bufs,
                          mean_bufs, [s["rank"] for s in snaps])


def unflatten(model: Any, flat: Any) -> dict[str, Any]:
    """The parameters of ``model``'s shape from one flat vector, by name (copies)."""
    out, off = {}, 0
    for name, p in model.named_parameters():
        out[name] = flat[off:off + p.numel()].reshape(p.shape).detach().to("cpu", copy=True)
        off += p.numel()
    return out


def worker_state(models: dict[str, Any], i: int) -> dict[str, Any]:
    """The ``state_dict`` of the i-th saved worker (``models["ranks"][i]``)."""
    shapes = {n: models["mean"][n].shape for n in models["param_names"]}
    out, off, row = {}, 0, models["X"][i]
    for name in models["param_names"]:
        k = math.prod(shapes[name])
        out[name] = row[off:off + k].reshape(shapes[name]).clone()
        off += k
    out.update(models["buffers"][i])
    return out


def save_models(path: str, payload: dict[str, Any]) -> None:
    """``torch.save`` the models dict to ``path``, atomically."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, buf.getvalue())


def load_models(path: str) -> dict[str, Any]:
    """The models dict a run saved; a missing, truncated or foreign file is a ConfigError."""
    import torch

    try:
        with warnings.catch_warnings():  # torch's note on the pickle protocol: not ours
            warnings.simplefilter("ignore")
            data = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ConfigError(f"models file {path!r} not found") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle refused, ...
        raise ConfigError(f"{path!r} is not a relaxsgd models file (it cannot be read: "
                          f"{type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != MODELS_FORMAT:
        raise ConfigError(f"{path!r} is not a relaxsgd models file (no "
                          f"format {MODELS_FORMAT!r})")
    return data


# -- interrupts ---------------------------------------------------------------------------

@contextlib.contextmanager
def shield_interrupts() -> Iterator[list[int]]:
    """Hold Ctrl-C (SIGINT) while the final outputs are written; yields a list that counts
    the interrupts held. Outside the main thread (where signals cannot be set) a no-op."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(1))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


def new_run_folder(label: str) -> str:
    """A folder name under ``runs/`` that does not exist yet: ``<time stamp>-<label>``,
    with ``-2``, ``-3``... when two runs start in the same second."""
    import time

    base = os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{label}")
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return path
