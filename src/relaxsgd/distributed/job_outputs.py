"""What rank 0 of a dist job writes: ``result.json`` (while running and at the end),
``metrics.csv``'s closing and the final models. (Split from :mod:`.runtime`: a mixin of
its ``_Job``, whose attributes it reads.)"""

from __future__ import annotations

import os
from typing import Any

from ..metrics import aggregate_worker_metrics
from ..outputs import final_models, save_models
from .evaluation import _Proxy
from .membership import CLEAN_LEAVE
from .process import startup_report


class JobOutputs:
    """The output side of ``runtime._Job`` (rank 0)."""

    prep: Any
    tr: Any
    ex: Any
    w: Any
    bank: Any
    el: Any
    rec: Any
    evaluator: Any
    backend: str
    device: Any
    n: int
    out: str | None
    pace: Any
    clock: dict[str, float]
    done_from: set[int]
    result_lock: Any
    result_final: bool

    def _security(self) -> dict[str, Any]:
        """How the point-to-point links were protected, and what was refused."""
        a = self.tr.auth
        return {"authenticated": not a.insecure, "tls": a.tls,
                "refused_connections": self.tr.refused}

    def _running(self, row: dict[str, Any], snaps: list[dict]) -> None:
        """result.json after every evaluation (status "running", evaluator thread), as the
        simulator writes it: a run killed at any moment leaves the figures so far."""
        from ..outputs import write_json

        with self.result_lock:
            if not self.result_final and self.out:
                write_json(os.path.join(self.out, "result.json"),
                           self._result("running", "", snaps, row["step"]))

    def _write(self, status: str, message: str) -> dict:
        from ..run import write_result

        ev, rec = self.evaluator, self.rec
        assert ev is not None and rec is not None
        if status != "completed":
            ev.stop(timeout=2.0)
        if ev.error is not None and status == "completed":  # (late: shown, not hidden)
            status, message = "failed", f"evaluation failed: {ev.error}"
        with self.result_lock:
            self.result_final = True
        rec.close()
        finals = [ev.finals[r] for r in sorted(ev.finals)]
        steps = sum(s["step"] for s in finals) / len(finals) if finals else float(self.w.step)
        result = self._result(status, message, finals, steps)
        if self.out:
            write_result(self.out, result, rec)
            if finals:  # every run saves its final models (format: relaxsgd.outputs)
                save_models(os.path.join(self.out, "models.pt"),
                            final_models(self.bank.template, finals))
        return result

    def _result(self, status: str, message: str, snaps: list[dict], steps: float) -> dict:
        """result.json of rank 0 from the workers' snapshots (their finals at the end)."""
        from ..run import make_result

        assert self.rec is not None
        units = sum(s["units"] for s in snaps)
        step_time = sum(s["compute_time"] for s in snaps) / units if units else 0.0
        result = make_result(self.prep, self.rec, status, message, step_time,
                             self.bank.batching,
                             aggregate_worker_metrics([_Proxy(s) for s in snaps]), steps)
        result["runtime"] = "dist"
        result["final"]["virtual_time_s"] = max((s["wall"] for s in snaps),
                                                default=self.ex.now())
        result["dist"] = {
            "backend": self.backend, "device": str(self.device), "world_size": self.n,
            # (a worker that said it is done and then closed is not lost: its "done", or
            # in an elastic job its clean leave in the registry, may come first)
            "lost_workers": {r: why for r, why in sorted(self.tr.dead.items())
                             if r not in self.done_from and why != CLEAN_LEAVE},
            "bytes_sent_per_worker": {s["rank"]: s["bytes"] for s in snaps},
            "wire_bytes_per_worker": {s["rank"]: s["wire"] for s in snaps},
            "step_time_s_per_worker": {s["rank"]: s["compute_time"] / max(s["units"], 1)
                                       for s in snaps},
            "program_time_s_per_worker": {s["rank"]: s["program_s"] for s in snaps},
            "startup_s": startup_report(self.clock),
        }
        result["dist"].update(self._security())
        if self.el is not None:  # an elastic job: who came and went (rank 0's view)
            result["membership"] = self.el.record()
        # what was really used, not the config's simulated defaults
        result["network"] = "real"
        result["network_model"] = {"kind": "real", "backend": self.backend,
                                   "lab": os.environ.get("RELAXSGD_LAB") or None,
                                   "master_addr": os.environ.get("MASTER_ADDR")}
        result["compute_model"] = {"kind": "real", "paced": self.pace is not None,
                                   "step_time_s": step_time}
        if self.out:
            result["out"] = self.out
        return result
