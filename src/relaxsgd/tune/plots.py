"""A tune's plots (matplotlib, PNG, atomically): the objective over trials, the Pareto
front of virtual time against bytes per worker, and the importance of each setting
(Optuna's fANOVA evaluator, per algorithm)."""

from __future__ import annotations

import io
import math
import os
from typing import Any

from .study import Plan


def _save(fig: Any, path: str) -> None:
    import matplotlib.pyplot as plt

    from ..outputs import atomic_write

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, dpi=100, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def write_plots(folder: str, plan: Plan, studies: dict[str, Any],
                rows: list[dict[str, Any]]) -> list[str]:
    """Write the plots; returns their file names (relative to ``folder``)."""
    import matplotlib

    matplotlib.use("Agg")
    names = []
    for name, fn in (("objective_over_trials.png", _objective), ("pareto.png", _pareto),
                     ("importance.png", _importance)):
        fig = fn(plan, studies, rows)
        if fig is not None:
            _save(fig, os.path.join(folder, name))
            names.append(name)
    return names


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _objective(plan: Plan, studies: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    obj = plan.obj()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    better = max if obj.direction == "maximize" else min
    for algo in plan.algos:
        pts = [(r["trial"], r["objective"]) for r in rows
               if r["algorithm"] == algo and _finite(r["objective"])
               and r["status"] == "complete"]
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        line = ax.plot(xs, ys, ".", alpha=0.6)[0]
        run = [better(ys[: i + 1]) for i in range(len(ys))]
        ax.step(xs, run, where="post", color=line.get_color(), label=algo)
    if obj.kind == "time-to" and all(r["objective"] > 0 for r in rows
                                     if r["status"] == "complete" and _finite(r["objective"])):
        ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel(obj.describe())
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _pareto(plan: Plan, studies: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt

    pts = [(r["virtual_time_s"], r["bytes_per_worker"], r["algorithm"]) for r in rows
           if r["status"] in ("complete", "over_budget") and _finite(r["virtual_time_s"])
           and _finite(r["bytes_per_worker"]) and r["virtual_time_s"] > 0
           and r["bytes_per_worker"] > 0]  # log axes: one worker sends nothing
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for algo in plan.algos:
        mine = [(t, b) for t, b, a in pts if a == algo]
        if mine:
            ax.plot(*zip(*mine, strict=True), ".", alpha=0.6, label=algo)
    front = pareto_front([(t, b) for t, b, _ in pts])
    ax.step(*zip(*front, strict=True), where="post", color="black", lw=1, label="Pareto front")
    ax.set_xlabel("virtual time s (at the target, or the end)")
    ax.set_ylabel("bytes sent per worker")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (both minimised), by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


MIN_IMPORTANCE_TRIALS = 5


def _importance(plan: Plan, studies: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    import matplotlib.pyplot as plt
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.trial import TrialState

    found = {}
    for algo in plan.algos:
        done = studies[algo].get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(done) < MIN_IMPORTANCE_TRIALS:
            continue  # fANOVA's forest on a handful of trials says nothing (and takes s)
        try:
            found[algo] = optuna.importance.get_param_importances(
                studies[algo], evaluator=FanovaImportanceEvaluator(seed=plan.seed),
                target=lambda t: t.values[0])
        except (ValueError, RuntimeError, IndexError, ZeroDivisionError):
            continue  # too few finished trials, or nothing varied
    found = {a: v for a, v in found.items() if v}
    if not found:
        return None
    fig, axes = plt.subplots(len(found), 1, figsize=(6.4, 1.2 + 0.45 * sum(
        len(v) for v in found.values())), squeeze=False)
    for ax, (algo, imp) in zip(axes[:, 0], found.items(), strict=True):
        keys = list(imp)[::-1]
        ax.barh(keys, [imp[k] for k in keys])
        ax.set_title(f"{algo}: fANOVA importance", fontsize=9)
        ax.set_xlim(0, 1)
    return fig
