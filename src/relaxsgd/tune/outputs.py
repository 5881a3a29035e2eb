"""What a tune leaves in its folder, rebuilt from the study database (so an interrupted or
resumed tune writes the same files): ``trials.csv``, ``<algo>/config.yaml`` (the best
trial's resolved config: ``relaxsgd run --config`` reruns it) with ``<algo>/trial.json``
(what that trial measured), ``report.md`` (the best of each algorithm against its
default), and the plots (:mod:`.plots`)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

from .objective import Objective
from .study import Plan, load_studies, status_of

COLUMNS = ["algorithm", "trial", "default", "status", "objective", "reached",
           "virtual_time_s", "bytes_per_worker", "metric", "evals", "wall_s"]


def best_trial(study: Any, obj: Objective) -> Any | None:
    """The best feasible finished trial (time-to: among those that reached the target
    when any did); None when there is none."""
    ok = [t for t in study.get_trials(deepcopy=False)
          if status_of(t) == "complete" and isinstance(t.user_attrs.get("value"), float)
          and math.isfinite(t.user_attrs["value"])
          and float(t.user_attrs.get("constraint", 0.0)) <= 0]
    if obj.kind == "time-to" and any(t.user_attrs.get("reached") for t in ok):
        ok = [t for t in ok if t.user_attrs.get("reached")]
    if not ok:
        return None
    sign = -1.0 if obj.direction == "maximize" else 1.0
    return min(ok, key=lambda t: (sign * t.user_attrs["value"], t.number))


def default_trial(study: Any) -> Any | None:
    return next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("default")
                 and status_of(t) != "killed"), None)


def settings(plan: Plan, algo: str, t: Any) -> dict[str, Any]:
    """Every searched key's value in trial ``t`` (keys it did not sample: the job's)."""
    return {**plan.defaults[algo], **t.params}


def trial_rows(plan: Plan, studies: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per finished trial (killed ones are left out: they were run again)."""
    rows = []
    for algo in plan.algos:
        for t in studies[algo].get_trials(deepcopy=False):
            st = status_of(t)
            if st in ("killed", "running", "waiting"):
                continue
            a = t.user_attrs
            rows.append({"algorithm": algo, "trial": t.number, "default": bool(a.get("default")),
                         "status": st, "objective": a.get("value"), "reached": a.get("reached"),
                         **{k: a.get(k) for k in COLUMNS[6:]},
                         **settings(plan, algo, t), "message": a.get("message", "")})
    return rows


def write_all(folder: str, quiet: bool = False) -> None:
    """Rebuild every output from the database (atomically, file by file)."""
    from ..outputs import atomic_write

    plan = Plan.load(folder)
    studies = load_studies(plan, folder)
    rows = trial_rows(plan, studies)
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "message"))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*keys, "message"], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(v) for k, v in r.items()})
    atomic_write(os.path.join(folder, "trials.csv"), buf.getvalue())
    _write_best(folder, plan, studies)
    plots: list[str] = []
    try:
        from .plots import write_plots

        plots = write_plots(folder, plan, studies, rows)
    except Exception as e:  # noqa: BLE001 - a plot must never lose the results
        if not quiet:
            print(f"relaxsgd: warning: tune plots not written: {e}")
    atomic_write(os.path.join(folder, "report.md"), report_md(plan, studies, plots))


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _write_best(folder: str, plan: Plan, studies: dict[str, Any]) -> None:
    from ..config import dump_yaml
    from ..outputs import write_json

    obj = plan.obj()
    for algo in plan.algos:
        t = best_trial(studies[algo], obj)
        if t is None or not t.user_attrs.get("config"):
            continue
        os.makedirs(os.path.join(folder, algo), exist_ok=True)
        dump_yaml(t.user_attrs["config"], os.path.join(folder, algo, "config.yaml"))
        info = {k: v for k, v in t.user_attrs.items() if k != "config"}
        write_json(os.path.join(folder, algo, "trial.json"),
                   {"algorithm": algo, "trial": t.number, "objective": obj.describe(),
                    "settings": settings(plan, algo, t), **info})


def summary(plan: Plan, studies: dict[str, Any]) -> list[dict[str, Any]]:
    """Per algorithm: the default's and the best trial's figures and the settings."""
    obj = plan.obj()
    out = []
    for algo in plan.algos:
        s = studies[algo]
        b, d = best_trial(s, obj), default_trial(s)
        sts = [status_of(t) for t in s.get_trials(deepcopy=False)]
        out.append({"algorithm": algo, "best": b, "default": d,
                    "best_settings": settings(plan, algo, b) if b is not None else {},
                    "counts": {k: sts.count(k) for k in dict.fromkeys(sts)
                               if k not in ("killed", "running", "waiting")}})
    return out


def _fig(t: Any, key: str, fmt: str) -> str:
    if t is None:
        return "-"
    v = t.user_attrs.get(key)
    if key == "value" and t.user_attrs.get("reached") is False:
        return f"({format(v, fmt)})" if isinstance(v, float) else "-"
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def table(plan: Plan, studies: dict[str, Any]) -> list[list[str]]:
    """The report's table as cells (header first)."""
    obj = plan.obj()
    rows = [["algorithm", "default", "default vtime s", "default MB/worker", "tuned",
             "tuned vtime s", "tuned MB/worker", "gain", "trials", "tuned settings"]]
    for r in summary(plan, studies):
        b, d = r["best"], r["default"]
        gain = _gain(obj, b, d)
        sets = ", ".join(f"{k}={_short(v)}" for k, v in r["best_settings"].items())
        counts = ", ".join(f"{n} {k}" for k, n in r["counts"].items())
        rows.append([r["algorithm"], _fig(d, "value", ".4g"), _fig(d, "virtual_time_s", ".1f"),
                     _mb(d), _fig(b, "value", ".4g"), _fig(b, "virtual_time_s", ".1f"), _mb(b),
                     gain, counts, sets or "-"])
    return rows


def _gain(obj: Objective, b: Any, d: Any) -> str:
    """Time-to: default time / tuned time (">" when the default never reached the
    target: its time is then more than its run's end); final: tuned - default."""
    if b is None or d is None or not isinstance(d.user_attrs.get("value"), float) \
            or b.user_attrs.get("reached") is False:
        return "-"
    bv, dv = b.user_attrs["value"], d.user_attrs["value"]
    if obj.kind != "time-to":
        return f"{bv - dv:+.4g}"
    if d.user_attrs.get("reached") is False:
        end = d.user_attrs.get("virtual_time_s")
        return f">{end / bv:.2f}x" if isinstance(end, float) and bv > 0 else "-"
    return f"{dv / bv:.2f}x" if bv > 0 else "-"


def _mb(t: Any) -> str:
    v = None if t is None else t.user_attrs.get("bytes_per_worker")
    return f"{v / 1e6:.2f}" if isinstance(v, (int, float)) else "-"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def report_md(plan: Plan, studies: dict[str, Any], plots: list[str]) -> str:
    obj = plan.obj()
    job = plan.jobs[plan.algos[0]]
    cells = table(plan, studies)
    budget = ", ".join(x for x in [f"{plan.trials} trials per algorithm" if plan.trials else "",
                                   f"{plan.time_s:g} s of wall time" if plan.time_s else ""]
                       if x)
    engine = "NSGA-II, Pareto front of objective and bytes" if plan.pareto else "TPE"
    lines = ["# relaxsgd tune", "",
             f"Objective: {obj.describe()} ({obj.direction}). Job: task {job.get('task')}, "
             f"{job.get('workers')} workers, network {job.get('network')}. Budget: {budget}; "
             f"seed {plan.seed}; {engine}"
             f"{', successive-halving pruning' if plan.prune and not plan.pareto else ''}.", "",
             "Default: the algorithm's configuration in the job (its first trial). Values in "
             "parentheses did not reach the target (extrapolated, penalised). Each tuned "
             "config is `<algo>/config.yaml` (`relaxsgd run --config` reruns it).", "",
             "| " + " | ".join(cells[0]) + " |", "|" + " --- |" * len(cells[0])]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells[1:]]
    lines += ["", *(f"![{p}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"


def show(folder: str) -> str:
    """The table of a tune folder, fixed width (``relaxsgd report DIR``)."""
    plan = Plan.load(folder)
    cells = table(plan, load_studies(plan, folder))
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    head = f"tune in {folder}: {plan.obj().describe()}"
    return "\n".join([head, fmt.format(*cells[0]), "  ".join("-" * w for w in widths),
                      *(fmt.format(*r) for r in cells[1:])])


def load_trial(folder: str, algo: str) -> dict[str, Any]:
    with open(os.path.join(folder, algo, "trial.json"), encoding="utf-8") as f:
        return json.load(f)
