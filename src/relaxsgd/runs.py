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
    from .userfiles import decode_text, read_bytes

    what = "result file"
    raw = read_bytes(path, what, MAX_RESULT_BYTES, "a half-written or foreign run folder")
    try:
        res = json.loads(decode_text(raw, path, what, "a half-written or foreign run folder"))
    except ValueError:
        raise ConfigError(f"{path!r} is not valid JSON (a half-written or foreign "
                          "file)") from None
    if not isinstance(res, dict) or not {"algorithm", "status"} <= set(res):
        raise ConfigError(f"{path!r} is not a relaxsgd result (no algorithm and status)")
    if not isinstance(res.get("final"), dict):
        res["final"] = {}
    return res


MAX_METRICS_BYTES = 256 << 20  # 100,000 evaluations of ~30 columns: ~40 MB
_NEED = ("virtual_time_s", "bytes_sent_total", "accuracy_mean_model")


def read_rows(folder: str, required: bool = False) -> list[dict[str, Any]]:
    """metrics.csv's rows as dicts of floats; ConfigError (one line) for a file that is
    not a relaxsgd metrics.csv (not text, no such header, a malformed line before the
    last). A last line cut short (a run killed while writing it) is dropped with a note.
    A missing file is no rows, unless ``required`` (the run's result.json says that it
    evaluated), when it is an error too."""
    from .userfiles import decode_text, read_bytes

    path = os.path.join(folder, "metrics.csv")
    if not os.path.lexists(path):
        if required:
            raise ConfigError(f"{folder!r} has a result.json with figures but no "
                              "metrics.csv (a half-copied or foreign run folder)")
        return []
    what = "metrics file"
    lines = decode_text(read_bytes(path, what, MAX_METRICS_BYTES), path, what,
                        "a half-written or foreign run folder").splitlines()
    if not lines:
        if required:
            raise ConfigError(f"{path!r} is empty (a half-written or foreign run folder)")
        return []
    header = next(csv.reader(lines[:1]))
    missing = [k for k in _NEED if k not in header]
    if missing:
        raise ConfigError(f"{path!r} is not a relaxsgd metrics.csv (its first line has no "
                          f"column {', '.join(missing)}; a foreign or damaged file)")
    rows = []
    for lineno, raw in enumerate(csv.DictReader(lines), 2):
        try:
            if None in raw or None in raw.values():
                raise ValueError("wrong number of fields")
            row = {k: float(v) for k, v in raw.items() if v != ""}
            if not all(k in row for k in _NEED):
                raise ValueError("a required figure is empty")
        except (TypeError, ValueError):
            if lineno == len(lines):  # the last line, cut by a kill
                sys.stderr.write(f"relaxsgd: note: the last line of {path!r} is cut short "
                                 "(the run was killed while writing it); it is left out\n")
                break
            raise ConfigError(f"line {lineno} of {path!r} is not a row of numbers (a "
                              "damaged or edited file)") from None
        rows.append(row)
    return rows


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
        runs.append((res["algorithm"], read_rows(f, required=bool(res["final"]))))
    table = summary_table(results)
    print(table)
    from .report import membership_lines

    events = membership_lines(results)  # churn: the membership events (issue 20)
    if events:
        print("\n".join(events).lstrip("\n"))
    plots: list[str] = []
    if out is not None:
        prepare_out_dir(out, force)
        members = [(str(r.get("algorithm")), r["membership"]) for r in results
                   if isinstance(r.get("membership"), dict)]
        plots = plot_runs(runs, out, title=plot_title(results[0], results),
                          **({"members": members} if members else {}))
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
