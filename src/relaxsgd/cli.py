"""The ``relaxsgd`` command line: ``run``, ``compare``, ``report``, ``list``, ``lab``,
``calibrate``, ``tune``.

Every bad input ends in one line ``relaxsgd: error: ...`` on stderr and exit status 2;
a diverged run exits 3 after writing what it measured; Ctrl-C exits 130 after the same.
Nothing heavy (torch) is imported at module level, so that a Ctrl-C during start-up is
caught by :func:`main` like any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from .compare import DEFAULT_COMPARE
from .errors import ConfigError, RelaxError, StoppedAtCheckpoint
from .jobargs import (
    CREATED,
    DIST_JOB,
    STARTED,
    config_dict,
    drop_empty_created,
    is_writer,
    output_folder,
)

__all__ = ["DEFAULT_COMPARE", "build_parser", "config_dict", "main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        sys.stderr.write(f"relaxsgd: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file; the flags below override it")
    p.add_argument("--task", help="task name (see 'relaxsgd list')")
    p.add_argument("--workers", type=int, help="number of workers n")
    p.add_argument("--topology", help="graph for decentralized algorithms")
    p.add_argument("--network", help="network profile: datacenter, cloud, wan, mobile, custom,"
                   " or a profile file written by 'relaxsgd calibrate'")
    p.add_argument("--steps", type=int, help="local steps per worker")
    p.add_argument("--epochs", type=float, help="passes over the training set, all workers "
                   "together")
    p.add_argument("--batch-size", type=int, help="batch size per worker")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--split", help="data split over workers: iid, shards, dirichlet, play")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", help="folder of the data set's files (MNIST, CIFAR-10); "
                   "default $RELAXSGD_DATA_DIR")
    p.add_argument("--runtime", help="sim (default) or dist (under torchrun)")
    p.add_argument("--evals", type=int, help="number of evaluations over the run")
    p.add_argument("--step-time", help="virtual seconds per local step, or 'measure' (time "
                   "this machine); default: derived from the model's FLOPs and --compute")
    p.add_argument("--compute", help="compute profile: laptop-core (default), server-core, "
                   "t4, v100, a100, h100, or a profile file written by 'relaxsgd calibrate'")
    p.add_argument("--device", help="where the simulator computes: auto (default: CUDA when "
                   "present, else cpu), cpu, cuda or cuda:K")
    p.add_argument("--out", help="output folder, new or empty (default: "
                   "runs/<time>-<algo>-<task>-n<workers>)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out: the "
                   "files an earlier run wrote there are replaced")
    p.add_argument("--checkpoint-every", metavar="STEPS|Xmin", help="save a checkpoint every "
                   "STEPS local steps per worker (in the simulator, a resumed run then equals "
                   "the uninterrupted one exactly) or every X minutes of wall time ('10min'); "
                   "Ctrl-C and SIGTERM also save one; continue with 'relaxsgd resume'")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any option: algo.p=8, task.model=cnn, split.alpha=0.1, "
                        "train.momentum=0.9, network.latency_s=0.05, ...")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="relaxsgd", description="Communication-efficient distributed training:"
                 " SwarmSGD, OLCO3 and their baselines, simulated or on torch.distributed.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    job = ("Without --config, the default job fills in what the flags leave unset: "
           "16 workers, the wan profile, 50 ms of virtual time per local step, iid split, 15 "
           "evaluations, and the task's recipe (MNIST-1D, the default task: its CNN on "
           "10,000 samples, 30 epochs, lr 0.1, momentum 0.9); algorithms take their own "
           "defaults (swarm: H=4 with the 8-bit lattice; olco3: p=4, s=1 through a "
           "parameter server) but localsgd averages every p=48 steps, diloco takes p=32, "
           "outer lr 0.977, outer momentum 0.281, and olco3 top-k 10% at lr 0.165 (tuned: "
           "README). With "
           "--config, the file and the dataclass defaults are the run.")
    r = sub.add_parser("run", help="train one algorithm", description="Train one "
                       "algorithm. " + job)
    r.add_argument("--algo", help="algorithm name (see 'relaxsgd list')")
    _common(r)
    c = sub.add_parser("compare", help="train several algorithms on the same setting; one "
                       "table and one set of plots",
                       description="Train several algorithms on the same setting. " + job
                       + " --set <algo>.<key>=value sets one algorithm's option.")
    c.add_argument("--algos", help="comma-separated algorithm names, each once (default: "
                   + ",".join(DEFAULT_COMPARE) + ", those available)")
    _common(c)
    rp = sub.add_parser("report", help="the table and plots of finished or stopped runs, "
                        "read back from their folders",
                        description="Read runs back from their folders (run folders, or "
                        "compare folders: every algorithm in them) and print one summary "
                        "table; --out writes the plots side by side, --markdown a report.")
    rp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or compare folders")
    rp.add_argument("--out", help="folder for the plots and summary.txt (new or empty)")
    rp.add_argument("--markdown", metavar="FILE", help="write a Markdown report (table, "
                    "setting, plots) to FILE")
    rp.add_argument("--force", action="store_true", help="write over --out / --markdown")
    rs = sub.add_parser("resume", help="continue a stopped run from its checkpoint",
                        description="Continue the run in RUN_DIR from its checkpoint "
                        "(checkpoint.pt): the same config, the same folder; metrics.csv "
                        "goes on from the checkpoint's row. A dist run is resumed under "
                        "torchrun with the same number of processes.")
    rs.add_argument("run_dir", metavar="RUN_DIR", help="the folder of the stopped run")
    rs.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    sub.add_parser("list", help="every registered plug-in with a one-line description")
    j = sub.add_parser("join", help="join a running elastic dist job as a new worker",
                       description="Join the running elastic job whose store is at "
                       "HOST:PORT (its MASTER_ADDR:MASTER_PORT) as a new worker: the same "
                       "secret (RELAXSGD_SECRET) and the same run flags as the job; "
                       "refused in one line once the job has elastic.max_workers workers "
                       "(docs/distributed.md).")
    j.add_argument("address", metavar="HOST:PORT", help="the job's rendezvous address")
    j.add_argument("--algo", help="algorithm name (as the job's)")
    _common(j)
    from .lab.cli import add_calibrate_parser, add_lab_parser

    add_lab_parser(sub)
    add_calibrate_parser(sub, _common)
    from .tune.cli import add_tune_parser

    add_tune_parser(sub, _common)
    ap.subcommands = dict(sub.choices)  # type: ignore[attr-defined]
    return ap


def _tell_the_job(args: Any, e: BaseException) -> None:
    """A worker of a --runtime dist job that fails before its run starts tells the others
    (through the rendezvous store), so that they stop at once naming it."""
    if DIST_JOB or getattr(args, "runtime", None) == "dist":
        from .distributed.rendezvous import announce

        announce(e)


def cmd_run(args: argparse.Namespace) -> int:
    from .config import from_dict
    from .report import summary_table
    from .run import run

    cfg = from_dict(config_dict(args, args.algo))
    cfg = dataclasses.replace(cfg, out=output_folder(args, cfg))
    result = run(cfg, progress=not args.quiet)
    if result is not None:
        print(summary_table([result]))
        print(f"outputs in {cfg.out}")
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    from .config import from_dict
    from .distributed.join import become, claim

    args.runtime = "dist"
    cfg = from_dict(config_dict(args, args.algo))
    become(claim(args.address, cfg))  # (its id claimed: from here a dist worker)
    DIST_JOB.append(True)
    return cmd_run(args)


def cmd_resume(args: argparse.Namespace) -> int:
    import contextlib

    from .runlock import RunLock

    folder = args.run_dir
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{folder!r} is not a run folder (it has no config.yaml); give "
                          "the folder a run wrote")
    with contextlib.ExitStack() as held:
        if is_writer():  # before the status is read: a second resume is refused here
            held.enter_context(RunLock(folder))
        status = _resume_locked(args, folder, path)
    return status


def _resume_locked(args: argparse.Namespace, folder: str, path: str) -> int:
    from .config import from_dict, load_yaml
    from .report import summary_table
    from .run import run
    from .runs import read_result

    try:
        status = read_result(folder)["status"]
    except ConfigError:
        status = None  # no result yet, or an unreadable one: the checkpoint decides
    if status == "completed":
        raise ConfigError(f"the run in {folder!r} already completed; nothing to resume "
                          f"(start a new one with 'relaxsgd run --config {path}')")
    cfg = from_dict({**load_yaml(path), "out": folder})
    STARTED.append(folder)
    result = run(cfg, progress=not args.quiet, resume=True)
    if result is not None and is_writer():
        print(summary_table([result]))
        print(f"outputs in {folder}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    return compare(args)


def cmd_report(args: argparse.Namespace) -> int:
    from .runs import report

    return report(args.run_dirs, args.out, args.markdown, args.force)


_MEMBERSHIP = {"gossip": "gossip: partners among the live workers",
               "quorum": "quorum: each round with the workers present",
               "fixed": "fixed: a leave fails the run"}


def _membership(name: str) -> str:
    """The algorithm's membership kind under churn, as its class declares it (a config can
    narrow it: SwarmSGD's sequential schedule is ``fixed``)."""
    from .algorithms import ALGORITHMS

    kind = getattr(ALGORITHMS.get(name), "membership", "fixed")
    return _MEMBERSHIP.get(kind, kind)


def cmd_list() -> int:
    from .algorithms import ALGORITHMS
    from .sim.compute import PROFILES as COMPUTE_PROFILES
    from .sim.network import PROFILE_DESCRIPTIONS
    from .tasks import TASKS

    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("algorithms (membership: what a worker leaving or joining does, "
         "docs/distributed.md \"Membership\")",
         [(e.name, f"{e.description} [{_membership(e.name)}]")
          for e in ALGORITHMS.entries()]),
        ("tasks", [(e.name, e.description) for e in TASKS.entries()]),
        ("network profiles", list(PROFILE_DESCRIPTIONS.items())
         + [("custom", "cloud's numbers with network.latency_s/bandwidth_Bps/... set")]),
        ("compute profiles", [(p.name, f"{p.flops_per_s / 1e9:g} GFLOP/s sustained, "
                               f"{p.overhead_s * 1e3:g} ms per step")
                              for p in COMPUTE_PROFILES.values()]),
        ("splits", [("iid", "uniformly at random, equal sizes"),
                    ("shards", "sorted by label, a few label shards per worker "
                     "(split.shards_per_worker)"),
                    ("dirichlet", "per-class proportions ~ Dirichlet(split.alpha)"),
                    ("play", "whole works per worker (shakespeare), near-equal sizes")]),
    ]
    for mod, attr, title in [("relaxsgd.compress", "COMPRESSORS", "compressors"),
                             ("relaxsgd.topology", "TOPOLOGIES", "topologies"),
                             ("relaxsgd.quantize", "QUANTIZERS", "quantizers")]:
        try:
            import importlib

            reg = getattr(importlib.import_module(mod), attr)
            sections.append((title, [(e.name, e.description) for e in reg.entries()]))
        except (ImportError, AttributeError):
            continue
    for title, items in sections:
        print(f"{title}:")
        for name, desc in items:
            print(f"  {name:<18} {desc}")
    return 0


def _import_torch_holding_ctrl_c() -> None:
    """Import torch (and numpy) with Ctrl-C held, then raise the held interrupt.

    A KeyboardInterrupt raised inside a C extension's import leaves it half-loaded:
    measured, an interrupt 0.25-0.35 s after start was lost (the run went on) or ended
    the process by the signal after our message, instead of exit 130. Holding it for the
    ~1 s the import takes costs nothing else."""
    from .outputs import shield_interrupts  # imports no torch

    with shield_interrupts() as held:
        import torch  # noqa: F401
    if held:
        raise KeyboardInterrupt


def _one_line(message: str, limit: int = 2000) -> str:
    """An error message as one line of at most ``limit`` characters (the last guard: the
    messages themselves cut what they quote, :func:`relaxsgd.errors.shown`)."""
    line = " ".join(message.split())
    return line if len(line) <= limit else f"{line[:limit]}... ({len(line):,} characters)"


def main(argv: list[str] | None = None) -> int:
    STARTED.clear()
    CREATED.clear()
    args = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the subcommand's parser, whose --help lists its flags
            parser.subcommands[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
        _import_torch_holding_ctrl_c()
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "compare":
            return cmd_compare(args)
        if args.cmd in ("lab", "calibrate"):
            from .lab import cli as lab_cli

            if args.cmd == "lab":
                return lab_cli.cmd_lab(args)
            return lab_cli.cmd_calibrate(args, config_dict(args, None))
        if args.cmd == "report":
            return cmd_report(args)
        if args.cmd == "resume":
            return cmd_resume(args)
        if args.cmd == "join":
            return cmd_join(args)
        if args.cmd == "tune":
            from .tune.cli import cmd_tune

            return cmd_tune(args)
        return cmd_list()
    except RelaxError as e:
        if e.exit_code == 2:
            drop_empty_created()
        sys.stderr.write(f"relaxsgd: error: {_one_line(str(e))}\n")
        sys.stderr.flush()
        _tell_the_job(args, e)
        return e.exit_code
    except KeyboardInterrupt as e:
        where = (f"; what was measured so far is in {STARTED[-1]}" if STARTED
                 else " before anything was written")
        if isinstance(e, StoppedAtCheckpoint):  # Ctrl-C or SIGTERM, with a checkpoint
            sys.stderr.write(f"relaxsgd: interrupted{where}; {e.note}\n")
            return e.exit_code
        sys.stderr.write(f"relaxsgd: interrupted{where}\n")
        return 130
    except BrokenPipeError:  # `relaxsgd list | head`: the reader left; nothing to say
        # Python flushes stdout again at exit and would print a traceback there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a process ended by SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
