"""Tables and plots of one run or of several runs side by side."""

from __future__ import annotations

import os
from typing import Any

Rows = list[dict[str, Any]]


def plot_runs(runs: list[tuple[str, Rows]], out: str, prefix: str = "") -> list[str]:
    """Write accuracy-vs-virtual-time and accuracy-vs-bytes PNGs; returns their paths."""
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
        fig.tight_layout()
        path = os.path.join(out, prefix + fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000:
            return f"{b:.1f} {unit}"
        b /= 1000
    return f"{b:.1f} PB"


def _fmt_acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def summary_table(results: list[dict[str, Any]]) -> str:
    """A fixed-width table of final figures, one line per run: the mean model's accuracy
    next to what the workers really hold (``acc workers``: the mean over workers of their
    own models' accuracy; ``acc shared``: the shared model ``xg`` where there is one)."""
    head = ["algorithm", "acc mean", "acc workers", "acc shared", "acc w0", "loss mean",
            "virtual s", "wall s", "bytes total", "stall s", "consensus", "status"]
    lines = []
    for r in results:
        f = r["final"]
        lines.append([
            r["algorithm"], f"{f['accuracy_mean_model']:.4f}",
            _fmt_acc(f.get("accuracy_workers_mean")), _fmt_acc(f.get("accuracy_shared_model")),
            f"{f['accuracy_worker0']:.4f}",
            f"{f['loss_mean_model']:.4f}", f"{f['virtual_time_s']:.2f}",
            f"{f['wall_time_s']:.1f}", _fmt_bytes(f["bytes_sent_total"]),
            f"{f['stall_time_s_mean']:.2f}", f"{f['consensus_distance']:.3g}", r["status"],
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
