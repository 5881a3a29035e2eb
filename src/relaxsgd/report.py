"""Tables and plots of one run or of several runs side by side."""

from __future__ import annotations

import io
import os
from typing import Any

from .outputs import atomic_write

Rows = list[dict[str, Any]]


def plot_runs(runs: list[tuple[str, Rows]], out: str, prefix: str = "",
              title: str = "", members: list[tuple[str, Any]] | None = None) -> list[str]:
    """Write accuracy-vs-virtual-time and accuracy-vs-bytes PNGs (atomically); returns
    their paths. ``title`` names the setting (:func:`plot_title`). ``members``: (label,
    ``result["membership"]``) of the runs with churn; when there is one, also
    ``live_workers_vs_time.png`` (issue 20)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for xkey, xlabel, fname in [
        ("virtual_time_s", "virtual time (s)", "accuracy_vs_time.png"),
        ("bytes_sent_total", "bytes sent, all workers", "accuracy_vs_bytes.png"),
    ]:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for label, rows in runs:
            xs = [float(r[xkey]) for r in rows]
            ys = [float(r["accuracy_mean_model"]) for r in rows]
            ax.plot(xs, ys, marker=".", label=label)
        positive = [float(r[xkey]) for _, rows in runs for r in rows if float(r[xkey]) > 0]
        if positive and max(positive) > 20 * min(positive):
            # runs that differ by orders of magnitude (all-reduce over a WAN against gossip)
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy of the mean model")
        ax.grid(alpha=0.3)
        ax.legend()
        paths.append(_save(fig, ax, title, os.path.join(out, prefix + fname)))
    if members:
        paths.append(_plot_members(members, os.path.join(out, prefix +
                                                         "live_workers_vs_time.png"), title))
    return paths


def _plot_members(members: list[tuple[str, Any]], path: str, title: str) -> str:
    """The number of live workers over virtual time, a step line per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for label, m in members:
        pts = (m or {}).get("live_over_time") or []
        if pts:
            ax.step([float(t) for t, _ in pts], [int(k) for _, k in pts], where="post",
                    label=label)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("live workers")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, ax, title, path)


def _save(fig: Any, ax: Any, title: str, path: str) -> str:
    """Title ``ax`` (if ``title``), lay ``fig`` out, write it as a PNG atomically, close it."""
    import matplotlib.pyplot as plt

    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def membership_lines(results: list[dict[str, Any]], limit: int = 20) -> list[str]:
    """Markdown lines of the membership events of the runs that had churn (the first
    ``limit`` of each, then how many more)."""
    lines: list[str] = []
    for r in results:
        m = r.get("membership")
        if not isinstance(m, dict):
            continue
        ev = [e for e in m.get("events") or [] if isinstance(e, dict)]
        counts = {k: sum(1 for e in ev if e.get("event") == k)
                  for k in ("leave", "rejoin", "join")}
        lines += ["", f"Membership of {r.get('algorithm')}: {counts['leave']} leave(s), "
                  f"{counts['rejoin']} rejoin(s), {counts['join']} join(s) "
                  f"(max_workers {m.get('max_workers')}, min_quorum {m.get('min_quorum')}).",
                  ""]
        lines += [f"- t={_num(e.get('time'), '.2f')}s worker {e.get('worker')} "
                  f"{e.get('event')} ({e.get('cause')})" for e in ev[:limit]]
        if len(ev) > limit:
            lines.append(f"- ... {len(ev) - limit} more in result.json")
    return lines


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def _num(v: Any, spec: str) -> str:
    """``v`` formatted, or "-" when it is missing (null in strict JSON: NaN, inf, none)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    return format(v, spec)


def summary_table(results: list[dict[str, Any]]) -> str:
    """A fixed-width table of final figures, one line per run ("-": not measured): the
    mean model's accuracy next to what the workers really hold (``acc workers``: the mean
    over workers of their own models' accuracy; ``acc shared``: the shared model ``xg``
    where there is one)."""
    head = ["algorithm", "acc mean", "acc workers", "acc shared", "acc w0", "loss mean",
            "virtual s", "wall s", "bytes total", "stall s", "consensus", "status"]
    lines = []
    for r in results:
        f = r.get("final") or {}
        b = f.get("bytes_sent_total")
        lines.append([
            str(r.get("algorithm")), _num(f.get("accuracy_mean_model"), ".4f"),
            _num(f.get("accuracy_workers_mean"), ".4f"),
            _num(f.get("accuracy_shared_model"), ".4f"),
            _num(f.get("accuracy_worker0"), ".4f"), _num(f.get("loss_mean_model"), ".4f"),
            _num(f.get("virtual_time_s"), ".2f"), _num(f.get("wall_time_s"), ".1f"),
            _fmt_bytes(b) if isinstance(b, (int, float)) else "-",
            _num(f.get("stall_time_s_mean"), ".2f"), _num(f.get("consensus_distance"), ".3g"),
            str(r.get("status")),
        ])
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*head), sep, *(fmt.format(*x) for x in lines)])


def time_to_target(rows: Rows, target: float, key: str = "virtual_time_s") -> float | None:
    """The first value of ``key`` at which the mean model's accuracy reached ``target``."""
    for r in rows:
        if float(r["accuracy_mean_model"]) >= target:
            return float(r[key])
    return None


def plot_title(result: dict[str, Any], others: list[dict[str, Any]] | None = None) -> str:
    """The setting in a plot's title: task, workers, network (and runtime if dist);
    "mixed" where the runs of a report differ."""
    runs = others or [result]

    def one(key: str) -> str:
        vals = {str(r.get(key)) for r in runs}
        return vals.pop() if len(vals) == 1 else "mixed"

    title = f"{one('task')}, {one('workers')} workers, network {one('network')}"
    return title + (", dist runtime" if one("runtime") == "dist" else "")


def markdown_report(results: list[dict[str, Any]], folders: list[str],
                    plots: list[str]) -> str:
    """A Markdown report of runs: setting, table (with each run's folder), plots."""
    lines = ["# relaxsgd report", "", f"Setting: {plot_title(results[0], results)}.", "",
             "| algorithm | acc mean | acc w0 | loss mean | virtual s | bytes total | "
             "status | folder |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r, folder in zip(results, folders, strict=True):
        f = r.get("final") or {}
        b = f.get("bytes_sent_total")
        cells = [str(r.get("algorithm")), _num(f.get("accuracy_mean_model"), ".4f"),
                 _num(f.get("accuracy_worker0"), ".4f"), _num(f.get("loss_mean_model"), ".4f"),
                 _num(f.get("virtual_time_s"), ".2f"),
                 _fmt_bytes(b) if isinstance(b, (int, float)) else "-",
                 str(r.get("status")), f"`{folder}`"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    notes = [f"- {r.get('algorithm')}: {r['message']}" for r in results if r.get("message")]
    if notes:
        lines += ["", *notes]
    lines += membership_lines(results)
    lines += ["", *(f"![{os.path.basename(p)}]({p})" for p in plots)]
    return "\n".join(lines) + "\n"
