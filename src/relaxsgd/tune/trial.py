"""One trial: a job's config dict run in the simulator (in this process, nothing written),
stopped early when its score is settled, scored by the objective.

A ``time-to`` trial stops at the first evaluation that reaches the target (what follows
cannot change its score), and, given ``bound`` (the best time to the target its
algorithm's study has measured so far), at the first evaluation past ``bound`` that has
not reached it: its time to the target is then more than the best's, so it cannot be the
best (status ``pruned``, message "past the best time so far"). Both are sound: neither
changes which trial is the best.

Statuses: ``complete``; ``pruned`` (the pruner stopped it); ``over_budget`` (it sent more
than ``--budget-bytes`` per worker: infeasible); ``refused`` (the algorithm or the job
refused the configuration: a ConfigError, not a crash); ``diverged``; ``failed`` (any
other error, with its message).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, RelaxError
from .objective import Objective

# (k, intermediate value) -> prune? k: how far the trial is on the job's grid of
# evaluations, from the local steps it has done (floor(step * evals / total steps)), not
# the index of its evaluation: an algorithm with a long period evaluates at fewer, later
# steps, so equal indices would compare trials at unequal progress
Prune = Callable[[int, float], bool]


class _Stop(Exception):
    """Raised from the evaluation hook to end a trial whose outcome is settled."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Outcome:
    """What a trial measured (the user attributes of its Optuna trial)."""

    status: str
    value: float | None = None
    reached: bool = False
    virtual_time_s: float | None = None
    bytes_per_worker: float | None = None
    metric: float | None = None
    evals: int = 0
    wall_s: float = 0.0
    message: str = ""
    config: dict[str, Any] | None = field(default=None, repr=False)

    def attrs(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def run_trial(job: dict[str, Any], objective: Objective, prune: Prune | None = None,
              bound: float | None = None) -> Outcome:
    """Run the raw config dict ``job`` and score it; never raises for a bad configuration
    or a diverged run (Ctrl-C still propagates). ``bound``: stop a time-to trial once it
    is past this virtual time without reaching the target (module docstring)."""
    from ..config import from_dict
    from ..run import prepare, simulate

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    grid = {"scale": 0.0, "evals": 0, "last": 0}  # set once the job is prepared

    def on_eval(row: dict[str, Any]) -> None:
        rows.append(row)
        reason = objective.stop_reason(row)
        if reason is not None:
            raise _Stop(reason)
        k = min(grid["evals"], int(float(row["step"]) * grid["scale"] + 1e-9))
        if prune is not None and k > grid["last"]:  # each grid point once; never at 0
            grid["last"] = k
            if prune(k, objective.intermediate(rows)):
                raise _Stop("pruned")
        if bound is not None and objective.kind == "time-to" and \
                float(row["virtual_time_s"]) > bound:
            raise _Stop("beaten")

    config = None
    status, message = "complete", ""
    try:
        prep = prepare(from_dict({**job, "out": None}))
        config = prep.resolved
        grid.update(scale=prep.cfg.evals / max(prep.total_steps, 1), evals=prep.cfg.evals)
        rows = simulate(prep, None, False, on_eval=on_eval).rows
    except _Stop as e:
        status = {"pruned": "pruned", "beaten": "pruned",
                  "bytes": "over_budget"}.get(e.reason, "complete")
        message = {"reached": "stopped at the target", "vtime": "stopped past --budget-vtime",
                   "bytes": "stopped past --budget-bytes",
                   "beaten": f"stopped past the best time so far ({bound or 0:.4g} virtual s)"
                   }.get(e.reason, "")
    except ConfigError as e:
        status, message = "refused", str(e)
    except RelaxError as e:  # a divergence (exit status 3), reported after its rows
        status, message = ("diverged" if e.exit_code == 3 else "failed"), str(e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - a crashing configuration must not stop a tune
        status, message = "failed", f"{type(e).__name__}: {e}"[:300]
    out = Outcome(status, message=message, config=config, evals=len(rows),
                  wall_s=time.perf_counter() - t0)
    if rows and status in ("complete", "pruned", "over_budget"):
        value, reached = objective.score(rows)
        kept = objective.within_budget(rows)
        last = kept[-1]
        at = next((r for r in kept if objective.reached(r)), last) \
            if objective.kind == "time-to" else last
        out.value, out.reached = value, reached
        out.virtual_time_s = float(at["virtual_time_s"])
        out.bytes_per_worker = float(at["bytes_sent_per_worker_max"])
        out.metric = objective.value(at)
    return out
