"""Reading run folders back: ``relaxsgd report RUN_DIR...``.

A run folder (from ``run``, or one algorithm's folder inside a ``compare`` folder) holds
``result.json`` and ``metrics.csv``; a ``compare`` folder holds one such folder per
algorithm. :func:`report` prints the summary table of every run found, writes the plots
side by side and, with ``--markdown FILE``, a Markdown report (setting, table, plots) a
user can paste. Runs made at different times compare this way; a stopped run (Ctrl-C,
divergence, SIGKILL) is read as far as it got. A folder that is not a run, or a run
whose files cannot be read, is one line naming the folder and what is wrong. A tune folder
(``relaxsgd tune``) prints its table of the best trial per algorithm against the default.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any

from .errors import ConfigError

MAX_RESULT_BYTES = 16 << 20  # a result.json is a few KB; anything huge is not ours


def read_result(folder: str) -> dict[str, Any]:
    """The run's result.json as a dict; ConfigError (one line) if missing or foreign."""
    path = os.path.join(folder, "result.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder!r} is not a relaxsgd run folder (no result.json); give "
                          "a folder written by 'relaxsgd run' or 'relaxsgd compare'")
    if os.path.getsize(path) > MAX_RESULT_BYTES:
        raise ConfigError(f"{path!r} is too large to be a relaxsgd result")
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{path!r} is not valid JSON (a half-written or foreign "
                          "file)") from None
    if not isinstance(res, dict) or not {"algorithm", "status"} <= set(res):
        raise ConfigError(f"{path!r} is not a relaxsgd result (no algorithm and status)")
    if not isinstance(res.get("final"), dict):
        res["final"] = {}
    return res


def read_rows(folder: str) -> list[dict[str, Any]]:
    """metrics.csv's rows as dicts of floats (a half-written last line is dropped)."""
    path = os.path.join(folder, "metrics.csv")
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        lines = f.read().splitlines()
    rows = []
    for raw in csv.DictReader(lines):
        try:
            rows.append({k: float(v) for k, v in raw.items() if k is not None and v != ""})
        except (TypeError, ValueError):
            continue  # a line cut short by a kill, or foreign text
    need = ("virtual_time_s", "bytes_sent_total", "accuracy_mean_model")
    return [r for r in rows if all(k in r for k in need)]


def find_runs(folder: str) -> list[str]:
    """The run folders in ``folder``: itself if it is a run, else its run subfolders."""
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder!r} is not a folder; give run folders written by "
                          "'relaxsgd run' or 'relaxsgd compare'")
    if os.path.isfile(os.path.join(folder, "result.json")):
        return [folder]
    subs = sorted(os.path.join(folder, d) for d in os.listdir(folder)
                  if os.path.isfile(os.path.join(folder, d, "result.json")))
    if not subs:
        raise ConfigError(f"{folder!r} is not a relaxsgd run folder (no result.json in it "
                          "or in its subfolders)")
    return subs


def _label(res: dict[str, Any], folder: str, labels: set[str]) -> str:
    label = str(res.get("algorithm"))
    if label in labels:  # the same algorithm twice: tell the runs apart by folder
        label = f"{label} ({os.path.basename(os.path.dirname(folder + '/'))})"
    labels.add(label)
    return label


def report(dirs: list[str], out: str | None, markdown: str | None, force: bool) -> int:
    """Print the table of the runs in ``dirs``; plots into ``out``; Markdown into a file."""
    from .outputs import atomic_write, prepare_out_dir
    from .report import markdown_report, plot_runs, plot_title, summary_table

    tunes = [d for d in dirs if os.path.isfile(os.path.join(d, "tune.json"))]
    if tunes:  # a tune folder: its table of the best per algorithm against the defaults
        from .tune.outputs import show

        for d in tunes:
            print(show(d))
        dirs = [d for d in dirs if d not in tunes]
        if not dirs:
            return 0
    folders = [f for d in dirs for f in find_runs(d)]
    results, runs, labels = [], [], set()
    for f in folders:
        res = read_result(f)
        res = {**res, "algorithm": _label(res, f, labels)}
        results.append(res)
        runs.append((res["algorithm"], read_rows(f)))
    table = summary_table(results)
    print(table)
    plots: list[str] = []
    if out is not None:
        prepare_out_dir(out, force)
        plots = plot_runs(runs, out, title=plot_title(results[0], results))
        atomic_write(os.path.join(out, "summary.txt"), table + "\n")
        print(f"plots in {out}", file=sys.stderr)
    if markdown is not None:
        if os.path.exists(markdown) and not force:
            raise ConfigError(f"--markdown {markdown!r} exists; give a new file name or add "
                              "--force")
        base = os.path.dirname(os.path.abspath(markdown))
        rel = [os.path.relpath(p, base) for p in plots]
        try:
            atomic_write(markdown, markdown_report(results, folders, rel))
        except OSError as e:
            raise ConfigError(f"cannot write --markdown {markdown!r}: "
                              f"{e.strerror or e}") from None
        print(f"Markdown report in {markdown}", file=sys.stderr)
    return 0
