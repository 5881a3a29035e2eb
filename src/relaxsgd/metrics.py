"""What a run records: one ``metrics.csv`` row per evaluation, and the final figures.

A row holds the progress (mean local steps per worker, epochs, samples), the clocks
(virtual and wall), communication (bytes, messages, stall), the mean model's and worker 0's
loss and accuracy on the test set, the training loss since the previous row, the consensus
distance (mean squared distance of the worker models to their mean), and the algorithm's
own counters (summed over workers) and observations (averaged). The mean model is
evaluated with the workers' BatchNorm statistics averaged.

The mean model is a model nobody holds: with compression compensation it contains
residuals no worker ever received (issue 9). So every row also gives the average, over the
workers, of the loss and accuracy of each worker's OWN model (``loss_workers_mean``,
``accuracy_workers_mean``, each with its own BatchNorm statistics), and, for an algorithm
whose workers all hold one shared model (OLCO3's ``xg``: ``Algorithm.shared_model_state``
names it in ``w.state``), that model's (``loss_shared_model``, ``accuracy_shared_model``).

The workers' own models are evaluated together (stacked, :func:`relaxsgd.bank.evaluate_many`)
and, with ``eval_worker_samples`` > 0, on a fixed subsample of the test set (the same
samples at every evaluation, drawn once from the run's seed-independent generator), while
the mean model, worker 0's and the shared model are always evaluated on the whole (or the
``eval_samples``-long) test set. ``result.json``'s ``evaluation`` says which.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .bank import eval_batched, evaluate, evaluate_many
from .tasks.base import TaskSpec
from .training import bind_params

BASE_COLUMNS = [
    "eval", "step", "epoch", "samples", "virtual_time_s", "wall_time_s",
    "bytes_sent_total", "bytes_sent_per_worker_max", "messages_total", "stall_time_s_mean",
    "bits_per_param_per_step", "bytes_per_worker_per_step", "train_loss", "loss_mean_model",
    "accuracy_mean_model", "loss_worker0", "accuracy_worker0", "consensus_distance",
    "loss_workers_mean", "accuracy_workers_mean", "live_workers",
]
SHARED_COLUMNS = ["loss_shared_model", "accuracy_shared_model"]
# Language models (TaskSpec.bits_per_token): the validation loss in bits per token (per
# character for shakespeare) of the mean model, and of each worker's own model averaged
# over the workers (what a worker would deploy without a final average).
LM_COLUMNS = ["bpc_mean_model", "bpc_workers"]
SUBSAMPLE_SEED = 20_240_917  # the workers' test subsample does not depend on the run's seed


@dataclass
class CommStats:
    bytes_total: float = 0.0
    bytes_per_worker_max: float = 0.0
    messages_total: int = 0
    stall_mean: float = 0.0


def consensus_distance(X: Tensor) -> float:
    """Mean over workers of ||x_i - mean||^2."""
    if X.shape[0] == 1:
        return 0.0
    return float(((X - X.mean(0, keepdim=True)) ** 2).sum(1).mean())


class Recorder:
    """Evaluates and writes rows; keeps the last row for ``result.json``."""

    def __init__(self, spec: TaskSpec, csv_path: str | None, n: int, d: int, n_train: int,
                 extra_columns: list[str], eval_samples: int = 0,
                 shared_model: bool = False, worker_samples: int = 0,
                 device: torch.device | None = None) -> None:
        self.spec, self.n, self.d, self.n_train = spec, n, d, n_train
        self.device = device or torch.device("cpu")
        self.model = spec.model_fn().to(self.device)
        x, y = spec.data.x_test, spec.data.y_test
        if eval_samples and eval_samples < x.shape[0]:
            x, y = x[:eval_samples], y[:eval_samples]
        self.x_test, self.y_test = x.to(self.device), y.to(self.device)
        self.x_workers, self.y_workers = self.x_test, self.y_test
        self.worker_subsample = 0 < worker_samples < x.shape[0]
        if self.worker_subsample:
            # a fixed subsample (the same at every evaluation and in every run): a seeded
            # permutation, not the first rows, since a test set may be ordered by class
            gen = torch.Generator().manual_seed(SUBSAMPLE_SEED)
            pick = torch.randperm(x.shape[0], generator=gen, device="cpu")
            pick = pick[:worker_samples].sort().values
            self.x_workers = self.x_test[pick.to(self.device)]
            self.y_workers = self.y_test[pick.to(self.device)]
        base = BASE_COLUMNS + (SHARED_COLUMNS if shared_model else [])
        self.columns = base + [c for c in extra_columns if c not in base]
        if spec.bits_per_token:
            self.columns += LM_COLUMNS
        self.last_mean: Tensor | None = None  # the mean model of the last row (sample.txt)
        self.rows: list[dict[str, Any]] = []
        self._file = None
        self._writer = None
        if csv_path is not None:
            self.open(csv_path)

    def open(self, csv_path: str) -> None:
        """Start ``csv_path`` afresh (header, then the rows so far) and write rows to it."""
        self._file = open(csv_path, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns,
                                      extrasaction="ignore")
        self._writer.writeheader()
        for row in self.rows:
            self._writer.writerow({k: _fmt(v) for k, v in row.items()})
        self._file.flush()

    def record(self, *, step: float, samples: int, virtual_time: float, wall_time: float,
               X: Tensor, mean_buffers: dict[str, Tensor], w0_buffers: dict[str, Tensor],
               comm: CommStats, train_loss: float, extra: dict[str, float],
               buffers_of: Callable[[int], dict[str, Tensor]] | None = None,
               shared: Tensor | None = None, live_workers: int | None = None
               ) -> dict[str, Any]:
        """Evaluate and write one row. ``buffers_of(k)``: worker k's BatchNorm statistics
        (None: worker 0's for all); ``shared``: the model every worker holds, if any;
        ``live_workers``: how many workers are live (churn; None: all n)."""
        mean = X.mean(0)
        lm, am = evaluate(self.spec, self.model, mean, mean_buffers, self.x_test, self.y_test)
        if self.n > 1:
            l0, a0 = evaluate(self.spec, self.model, X[0], w0_buffers, self.x_test, self.y_test)
        else:
            l0, a0 = lm, am
        lw, aw = self._workers_mean(X, (l0, a0), buffers_of or (lambda k: w0_buffers))
        steps_done = max(step, 1e-12)
        row = {
            "eval": len(self.rows), "step": round(step, 3),
            "epoch": round(samples / max(self.n_train, 1), 4), "samples": samples,
            "virtual_time_s": virtual_time, "wall_time_s": round(wall_time, 3),
            "bytes_sent_total": int(comm.bytes_total),
            "bytes_sent_per_worker_max": int(comm.bytes_per_worker_max),
            "messages_total": comm.messages_total, "stall_time_s_mean": comm.stall_mean,
            "bits_per_param_per_step": (8 * comm.bytes_total / (self.n * self.d * steps_done)
                                        if step > 0 else 0.0),
            "bytes_per_worker_per_step": comm.bytes_total / (self.n * steps_done)
            if step > 0 else 0.0,
            "train_loss": train_loss, "loss_mean_model": lm, "accuracy_mean_model": am,
            "loss_worker0": l0, "accuracy_worker0": a0,
            "consensus_distance": consensus_distance(X),
            "loss_workers_mean": lw, "accuracy_workers_mean": aw,
            "live_workers": self.n if live_workers is None else live_workers,
        }
        if shared is not None:
            row["loss_shared_model"], row["accuracy_shared_model"] = evaluate(
                self.spec, self.model, shared, mean_buffers, self.x_test, self.y_test)
        if self.spec.bits_per_token:
            # the loss is cross-entropy in nats per token; the workers' own models were
            # evaluated once above, for loss_workers_mean
            row["bpc_mean_model"] = lm / math.log(2)
            row["bpc_workers"] = lw / math.log(2)
        self.last_mean = mean
        row.update(extra)
        self.rows.append(row)
        if self._writer is not None:
            self._writer.writerow({k: _fmt(v) for k, v in row.items()})
            self._file.flush()
        return row

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Take the rows of a checkpoint as the rows so far (written to the file if one is
        open; else :meth:`open` writes them)."""
        self.rows = [dict(r) for r in rows]
        if self._writer is not None:
            for row in self.rows:
                self._writer.writerow({k: _fmt(v) for k, v in row.items()})
            self._file.flush()

    def eval_info(self) -> dict[str, Any]:
        """On what the models are evaluated (``result.json``'s ``evaluation``)."""
        return {"mean_model_samples": int(self.x_test.shape[0]),
                "worker_samples": int(self.x_workers.shape[0]),
                "worker_subsample": self.worker_subsample,
                "workers_batched": eval_batched(self.spec, self.device)}

    def _workers_mean(self, X: Tensor, first: tuple[float, float],
                      buffers_of: Callable[[int], dict[str, Tensor]]) -> tuple[float, float]:
        """Mean over workers of (loss, metric) of each one's own model on the workers' test
        samples; ``first`` is worker 0's on the whole test set. The models are evaluated
        together; those whose parameters and statistics equal worker 0's are not
        re-evaluated (all of them, after a synchronous average)."""
        b0 = buffers_of(0)
        same = [k == 0 or (torch.equal(X[k], X[0]) and all(
            torch.equal(buffers_of(k)[n], b0[n]) for n in b0)) for k in range(X.shape[0])]
        rows = [k for k in range(X.shape[0]) if not same[k]]
        if self.worker_subsample:
            rows = [0, *rows]  # worker 0 too, on the same samples as the others
        if not rows:
            return first
        bufs = ({n: torch.stack([buffers_of(k)[n] for k in rows]) for n in b0}
                if b0 else None)
        ls, ms = evaluate_many(self.spec, self.model, X[rows] if len(rows) < X.shape[0]
                               else X, bufs, self.x_workers, self.y_workers)
        got = dict(zip(rows, zip(ls, ms, strict=True), strict=True))
        base = got.get(0, first)
        vals = [got.get(k, base) for k in range(X.shape[0])]
        return (sum(v[0] for v in vals) / len(vals), sum(v[1] for v in vals) / len(vals))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def aggregate_worker_metrics(workers: list[Any]) -> dict[str, float]:
    """Counters summed over workers; observations averaged (``<key>_mean``)."""
    out: dict[str, float] = {}
    for w in workers:
        for k, v in w.counters.items():
            out[k] = out.get(k, 0.0) + v
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for w in workers:
        for k, v in w.obs_sum.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + w.obs_count[k]
    for k, v in sums.items():
        out[f"{k}_mean"] = v / counts[k] if counts[k] else float("nan")
    return out


def write_sample(out: str, rec: Recorder) -> str | None:
    """Write ``sample.txt``: text generated by the last row's mean model, for tasks that
    generate (``TaskSpec.sample_fn``); returns the path, or None when there is nothing."""
    if rec.spec.sample_fn is None or rec.last_mean is None:
        return None
    model = rec.spec.model_fn()
    bind_params(model, rec.last_mean.detach().to("cpu", copy=True))  # the model is on the CPU
    path = os.path.join(out, "sample.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(rec.spec.sample_fn(model) + "\n")
    return path
