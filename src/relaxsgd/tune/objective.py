"""What a trial scores: ``time-to:<metric>=<target>`` or ``final``, under optional
budgets of virtual time and bytes per worker.

Metrics are those of the mean model, as ``metrics.csv`` records them: ``accuracy``
(higher is better; classification tasks), ``loss`` (lower), ``bpc`` (bits per character,
lower; language-model tasks).

``time-to:M=T`` (minimise): the virtual time of the first evaluation at which the metric
reaches T; the trial stops there (what follows cannot change its score). A trial that
ends (the job's length, or ``--budget-vtime``) without reaching T scores an
extrapolation, penalised: with f the fraction of the way from the first evaluation's
metric to T covered by the best one seen (clipped to [0.02, 1]), the score is
``2 * t_end / f``, always more than twice the time it ran, so a trial that reached T in
the same time always ranks ahead. The best trial is chosen among those that reached T
when any did. Pruning compares the same estimate at equal evaluation counts.

``final`` or ``final:M`` (maximise accuracy, minimise loss or bpc; bare ``final`` takes
the task's own metric: bpc for the language model, accuracy, else loss): the metric at
the end of the job, or with ``--budget-vtime S`` at the last evaluation at or before S
virtual seconds (the trial stops at the first evaluation past S).

``--budget-bytes B``: a constraint, not a score: a trial whose busiest worker has sent
more than B bytes stops there and is infeasible (never the best; TPE and NSGA-II are told
through their ``constraints_func``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

# name -> (metrics.csv column, higher is better)
METRICS = {"accuracy": ("accuracy_mean_model", True), "loss": ("loss_mean_model", False),
           "bpc": ("bpc_mean_model", False)}
ALIASES = {"acc": "accuracy", "bits-per-char": "bpc", "bits_per_char": "bpc"}
PENALTY = 2.0
MIN_PROGRESS = 0.02


@dataclass(frozen=True)
class Objective:
    """A parsed ``--objective`` with its budgets."""

    kind: str  # "time-to" or "final"
    metric: str
    target: float | None = None
    budget_vtime: float | None = None
    budget_bytes: float | None = None

    @property
    def column(self) -> str:
        return METRICS[self.metric][0]

    @property
    def higher_better(self) -> bool:
        return METRICS[self.metric][1]

    @property
    def direction(self) -> str:
        if self.kind == "time-to":
            return "minimize"
        return "maximize" if self.higher_better else "minimize"

    def describe(self) -> str:
        what = (f"virtual time to {self.metric} {'>=' if self.higher_better else '<='} "
                f"{self.target:g}" if self.kind == "time-to" else f"final {self.metric}")
        if self.budget_vtime is not None:
            what += f", within {self.budget_vtime:g} virtual s"
        if self.budget_bytes is not None:
            what += f", at most {self.budget_bytes:.3g} bytes per worker"
        return what

    def for_task(self, spec: Any, task: str) -> Objective:
        """This objective for ``task`` (a bare ``final`` takes the task's own metric: bpc
        for a language model, accuracy for classification, else loss); ConfigError unless
        the task reports the metric."""
        import dataclasses

        if not self.metric:
            metric = ("bpc" if spec.bits_per_token else
                      "accuracy" if spec.metric == "accuracy" else "loss")
            return dataclasses.replace(self, metric=metric)
        if self.metric == "bpc" and not spec.bits_per_token:
            raise ConfigError(f"task {task!r} reports no bits per character (bpc is the "
                              "language model's metric); use accuracy or loss")
        if self.metric == "accuracy" and spec.metric != "accuracy":
            raise ConfigError(f"task {task!r} reports no accuracy (its metric is "
                              f"{spec.metric}); use loss")
        return self

    def value(self, row: dict[str, Any]) -> float:
        v = row.get(self.column)
        return float(v) if isinstance(v, (int, float)) else math.nan

    def reached(self, row: dict[str, Any]) -> bool:
        v = self.value(row)
        assert self.target is not None
        return v >= self.target if self.higher_better else v <= self.target

    def stop_reason(self, row: dict[str, Any]) -> str | None:
        """Why a trial may stop at this evaluation: "reached", "vtime", "bytes" or None."""
        if self.budget_bytes is not None and \
                float(row["bytes_sent_per_worker_max"]) > self.budget_bytes:
            return "bytes"
        if self.kind == "time-to" and self.reached(row):
            return "reached"
        if self.budget_vtime is not None and float(row["virtual_time_s"]) > self.budget_vtime:
            return "vtime"
        return None

    def score(self, rows: list[dict[str, Any]]) -> tuple[float, bool]:
        """(score, reached) of a trial's evaluation rows (``reached`` is True for
        ``final``); rows past --budget-vtime do not count."""
        rows = self.within_budget(rows)
        if self.kind == "final":
            return self.value(rows[-1]), True
        for r in rows:
            if self.reached(r):
                return float(r["virtual_time_s"]), True
        return self.extrapolate(rows), False

    def within_budget(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.budget_vtime is None:
            return rows
        kept = [r for r in rows if float(r["virtual_time_s"]) <= self.budget_vtime]
        return kept or rows[:1]

    def extrapolate(self, rows: list[dict[str, Any]]) -> float:
        """The penalised estimate of the time to the target (module docstring)."""
        assert self.target is not None
        t_end = max(float(rows[-1]["virtual_time_s"]), 1e-9)
        vals = [self.value(r) for r in rows]
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            return PENALTY * t_end / MIN_PROGRESS
        best = max(vals) if self.higher_better else min(vals)
        gap = self.target - vals[0]
        frac = (best - vals[0]) / gap if gap else 1.0
        return PENALTY * t_end / min(max(frac, MIN_PROGRESS), 1.0)

    def intermediate(self, rows: list[dict[str, Any]]) -> float:
        """What pruning compares at an evaluation: the score the trial would have if it
        ended now (time-to: the extrapolation, or the time if reached)."""
        value, _ = self.score(rows)
        return value


def parse_objective(text: str, budget_vtime: float | None = None,
                    budget_bytes: float | None = None) -> Objective:
    """``--objective``: ``final``, ``final:<metric>``, or ``time-to:<metric>=<target>``."""
    hint = "give time-to:accuracy=0.96, time-to:bpc=2.1, final or final:loss"
    for name, v in (("--budget-vtime", budget_vtime), ("--budget-bytes", budget_bytes)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"{name} must be a positive number, got {v:g}")
    kind, _, rest = text.strip().partition(":")
    if kind == "final":
        metric = ALIASES.get(rest, rest)
        if metric and metric not in METRICS:
            raise ConfigError(f"--objective {text!r}: unknown metric {rest!r}; choose one of: "
                              f"{', '.join(METRICS)}")
        return Objective("final", metric, None, budget_vtime, budget_bytes)
    if kind != "time-to":
        raise ConfigError(f"--objective {text!r} is not an objective; {hint}")
    name, eq, target = rest.partition("=")
    metric = ALIASES.get(name.strip(), name.strip())
    if metric not in METRICS:
        raise ConfigError(f"--objective {text!r}: unknown metric {name!r}; choose one of: "
                          f"{', '.join(METRICS)}")
    try:
        value = float(target) if eq else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConfigError(f"--objective {text!r} needs a numeric target; {hint}")
    if metric == "accuracy" and not 0 < value <= 1:
        raise ConfigError(f"--objective {text!r}: an accuracy target is in (0, 1]")
    return Objective("time-to", metric, value, budget_vtime, budget_bytes)
