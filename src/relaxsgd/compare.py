"""``relaxsgd compare``: several algorithms on one setting, one table and one set of plots.

Every algorithm's config is built and checked before the first run starts (a bad option is
one line and nothing is written). The runs follow each other, each into ``<out>/<algo>``;
an algorithm that diverges does not stop the comparison (its row says ``diverged``), but
once the summary is written the exit status is 3, as for a diverged run, with one line
naming the diverged algorithms: a script or CI job must not take a comparison with a
failed algorithm for a clean one. Ctrl-C stops it after writing the summary and the
plots of what was measured so far (the interrupted algorithm included), then exits 130.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any

from .errors import ConfigError, Diverged, RelaxError, StoppedAtCheckpoint

DEFAULT_COMPARE = ["allreduce", "localsgd", "swarm", "olco3"]


def parse_algos(text: str | None) -> list[str]:
    """The --algos list: known names, no duplicates, not empty (else one ConfigError)."""
    from .algorithms import ALGORITHMS

    if text is None:
        return [a for a in DEFAULT_COMPARE if a in ALGORITHMS]
    algos = [a.strip() for a in text.split(",") if a.strip()]
    if not algos:
        raise ConfigError(f"--algos {text!r} names no algorithm; give comma-separated names, "
                          f"e.g. --algos {','.join(DEFAULT_COMPARE[:2])}")
    for a in algos:
        ALGORITHMS.entry(a)  # unknown name: one line with the choices
    dups = sorted({a for a in algos if algos.count(a) > 1})
    if dups:
        raise ConfigError(f"--algos names {', '.join(dups)} more than once; each algorithm "
                          "runs once (into its own folder)")
    return algos


def _per_algorithm_sets(items: list[str], algos: list[str]
                        ) -> tuple[list[str], dict[str, list[str]]]:
    """Split --set items into shared ones and ``<algo>.<key>=value`` ones."""
    shared: list[str] = []
    per: dict[str, list[str]] = {a: [] for a in algos}
    for item in items:
        head, dot, rest = item.partition(".")
        if dot and head in per:
            per[head].append(f"algo.{rest}")
        else:
            shared.append(item)
    return shared, per


def build_configs(args: argparse.Namespace, algos: list[str]) -> tuple[dict[str, Any], list]:
    """The shared config dict and one checked RunConfig per algorithm (``out`` unset)."""
    from .algorithms import ALGORITHMS
    from .config import _typed, from_dict, parse_value
    from .defaults import algorithm_options
    from .jobargs import config_dict
    from .run import build_topology

    shared, per = _per_algorithm_sets(args.set, algos)
    args.set = [s for s in shared if not s.startswith("algo.")]
    common_algo = [s for s in shared if s.startswith("algo.")]
    base = config_dict(args, algos[0])
    configs = []
    graph_checked = False
    for a in algos:
        opts = algorithm_options(a) if not args.config else {}
        if a == algos[0]:
            opts.update(base.get("algo_options") or {})
        for item in common_algo + per[a]:
            key, _, text = item[len("algo."):].partition("=")
            opts[key] = parse_value(text)
        # the default job's training options may differ per algorithm (defaults.py)
        own = base if args.config or a == algos[0] else config_dict(args, a)
        cfg = from_dict({**base, "train": own.get("train"), "algo": a, "algo_options": opts,
                         "out": None})
        # every algorithm's options (and graph) are checked before the first run starts
        _typed(ALGORITHMS.get(a).Config, cfg.algo_options, f"algorithm {a!r}")
        if ALGORITHMS.get(a).needs_topology and not graph_checked:
            build_topology(cfg)  # an unreadable edge list is refused before any run
            graph_checked = True
        configs.append(cfg)
    fixed = [c.algo for c in configs if c.elastic.churn.active
             and getattr(ALGORITHMS.get(c.algo), "membership", "fixed") == "fixed"]
    if fixed:  # refused before the first run, not after the others (issue 20)
        raise ConfigError(f"{', '.join(fixed)} cannot run with elastic.churn (membership "
                          "'fixed': see docs/distributed.md, Membership); leave them out of "
                          "--algos")
    return base, configs


def compare(args: argparse.Namespace) -> int:
    from .config import from_dict
    from .jobargs import output_folder

    algos = parse_algos(args.algos)
    base, configs = build_configs(args, algos)
    out = output_folder(args, from_dict({**base, "algo": "compare", "algo_options": {}}))
    from .jobargs import is_writer
    from .runlock import RunLock

    with RunLock(out) if is_writer() else contextlib.nullcontext():
        return _compare_into(args, out, configs)


def _compare_into(args: argparse.Namespace, out: str, configs: list) -> int:
    """The runs of a comparison into ``out`` (whose lock is held), then the summary."""
    import dataclasses

    done: list[tuple[dict[str, Any], str]] = []  # (result, folder) of the runs made
    diverged: list[str] = []
    try:
        for cfg in configs:
            cfg = dataclasses.replace(cfg, out=os.path.join(out, cfg.algo))
            res = _run_one(cfg, not args.quiet, diverged)
            if res is not None:
                done.append((res, cfg.out))
    except (KeyboardInterrupt, StoppedAtCheckpoint):  # Ctrl-C, with or without a checkpoint
        _collect_interrupted(done, out, [c.algo for c in configs])
        _write_summary(done, out, interrupted=True)
        raise
    if done:  # else a worker of rank > 0 in --runtime dist: rank 0 writes
        _write_summary(done, out, interrupted=False)
    if diverged:
        word = "diverged or failed" if any(d.endswith(" (failed)") for d in diverged) \
            else "diverged"
        raise ComparisonDiverged(
            f"{len(diverged)} of {len(configs)} algorithms {word} ({', '.join(diverged)}; "
            "the warning above says where); the others ran to the end and the summary "
            f"holds every row (outputs in {out})")
    return 0


class ComparisonDiverged(RelaxError):
    """Some algorithm of a finished comparison diverged (the others ran; the summary is
    written): exit status 3, as for a diverged run."""

    exit_code = Diverged.exit_code


def _run_one(cfg: Any, progress: bool, diverged: list[str]) -> dict[str, Any] | None:
    """One algorithm's run; a divergence is reported, its algorithm added to
    ``diverged`` and its written result returned."""
    from .membership import NotElastic, QuorumLost
    from .run import run
    from .runs import read_result

    try:
        return run(cfg, progress=progress)
    except RelaxError as e:
        # a diverged run or one that lost its quorum under churn is a result; anything
        # else stops the comparison
        if e.exit_code != Diverged.exit_code and not isinstance(e, (QuorumLost, NotElastic)):
            raise
        sys.stderr.write(f"relaxsgd: warning: {cfg.algo} {e}; the comparison goes on\n")
        diverged.append(cfg.algo if e.exit_code == Diverged.exit_code
                        else f"{cfg.algo} (failed)")
        return read_result(cfg.out) if os.path.isfile(os.path.join(cfg.out, "result.json")) \
            else None


def _collect_interrupted(done: list, out: str, algos: list[str]) -> None:
    """Add the run that was interrupted (it wrote its result.json) to ``done``."""
    from .runs import read_result

    ran = {r["algorithm"] for r, _ in done}
    for a in algos:
        folder = os.path.join(out, a)
        if a not in ran and os.path.isfile(os.path.join(folder, "result.json")):
            try:
                done.append((read_result(folder), folder))
            except ConfigError:
                pass  # nothing readable: the row is left out


def _write_summary(done: list, out: str, interrupted: bool) -> None:
    """summary.txt and the plots of the runs made; printed; Ctrl-C held meanwhile."""
    from .outputs import atomic_write, shield_interrupts
    from .report import plot_runs, plot_title, summary_table
    from .runs import read_rows

    if not done:
        return
    with shield_interrupts():
        table = summary_table([r for r, _ in done])
        note = "\n(interrupted: the table holds the runs made so far)" if interrupted else ""
        atomic_write(os.path.join(out, "summary.txt"), table + note + "\n")
        runs = [(r["algorithm"], read_rows(folder)) for r, folder in done]
        try:
            members = [(r["algorithm"], r["membership"]) for r, _ in done
                       if isinstance(r.get("membership"), dict)]
            plot_runs(runs, out, title=plot_title(done[0][0]),
                      **({"members": members} if members else {}))
        except Exception as e:  # noqa: BLE001 - a plot must never lose the table
            print(f"relaxsgd: warning: plots not written: {e}", file=sys.stderr)
    print(table + note)
    print(f"outputs in {out} (summary.txt, accuracy_vs_time.png, accuracy_vs_bytes.png)")
