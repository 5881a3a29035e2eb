"""What a run reports: result.json's content and the files written beside it.

Shared by the simulator (:mod:`relaxsgd.simulation`) and the distributed runtime, so that
both write the same keys.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from .config import RunConfig
from .errors import RelaxError
from .metrics import LM_COLUMNS, Recorder, write_sample
from .outputs import write_json

if TYPE_CHECKING:
    from .run import Prepared

INTERRUPTED = "interrupted by the user (Ctrl-C); the final figures are those of the last " \
    "evaluation"
INTERRUPTED_FINAL = "interrupted by the user (Ctrl-C) during the final evaluation; the " \
    "final figures are those of the evaluation before it"


class DivergedAfterWrite(RelaxError):
    """A divergence reported after the outputs were written."""

    exit_code = 3

    def __init__(self, message: str, out: str | None) -> None:
        super().__init__(message + (f" (outputs so far in {out})" if out else ""))


def make_result(prep: Prepared, rec: Recorder, status: str, message: str, step_time: float,
                batching: str, worker_metrics: dict[str, float], steps: float
                ) -> dict[str, Any]:
    cfg = prep.cfg
    last = rec.rows[-1] if rec.rows else {}
    keys = ["accuracy_mean_model", "accuracy_worker0", "loss_mean_model", "loss_worker0",
            "accuracy_workers_mean", "loss_workers_mean", "accuracy_shared_model",
            "loss_shared_model",
            "virtual_time_s", "wall_time_s", "bytes_sent_total", "bytes_sent_per_worker_max",
            "messages_total", "stall_time_s_mean", "consensus_distance",
            "bits_per_param_per_step", "samples", "epoch"]
    final = {k: last.get(k) for k in keys}
    if "accuracy_shared_model" not in last:  # only for an algorithm with a shared model
        del final["accuracy_shared_model"], final["loss_shared_model"]
    final["steps_per_worker"] = steps
    final["samples_total"] = final.pop("samples")
    final["epochs"] = final.pop("epoch")
    final["bytes_per_worker_per_step"] = (
        (final["bytes_sent_total"] or 0) / cfg.workers / steps if steps else 0.0)
    final.update(worker_metrics)
    final.update({k: last[k] for k in LM_COLUMNS if k in last})
    best = max((r["accuracy_mean_model"] for r in rec.rows), default=None)
    return {
        **result_header(cfg), "status": status, "message": message,
        "step_time_s": step_time, "batching": batching,
        "algo_options": prep.resolved["algo_options"], "final": final,
        "best_accuracy_mean_model": best,
        "best_accuracy_workers_mean": max((r["accuracy_workers_mean"] for r in rec.rows),
                                          default=None),
    }


def result_header(cfg: RunConfig) -> dict[str, Any]:
    """What result.json says about the setting (also when the run never started)."""
    return {"algorithm": cfg.algo, "task": cfg.task, "workers": cfg.workers,
            "runtime": cfg.runtime, "seed": cfg.seed, "network": cfg.network,
            "split": cfg.split, "topology": cfg.topology}


def write_result(out: str, result: dict[str, Any], rec: Recorder) -> None:
    """result.json (strict JSON, atomically) and the plots of one run."""
    write_json(os.path.join(out, "result.json"), result)
    try:
        write_sample(out, rec)
    except Exception as e:  # a sample must never lose the measured results
        print(f"relaxsgd: warning: sample.txt not written: {e}", file=sys.stderr)
    try:
        from .report import plot_runs, plot_title

        # the membership plot only for a run with churn (the call is as before otherwise)
        more = {"members": [(result["algorithm"], result["membership"])]} \
            if "membership" in result else {}
        plot_runs([(result["algorithm"], rec.rows)], out, title=plot_title(result), **more)
    except Exception as e:  # a plot must never lose the measured results
        print(f"relaxsgd: warning: plots not written: {e}", file=sys.stderr)
