"""The ``relaxsgd`` command line: ``run``, ``compare``, ``list``.

Every bad input ends in one line ``relaxsgd: error: ...`` on stderr and exit status 2;
a diverged run exits 3 after writing what it measured; Ctrl-C exits 130 after the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

from .config import apply_set, from_dict, load_yaml
from .errors import ConfigError, RelaxError

DEFAULT_COMPARE = ["allreduce", "localsgd", "swarm", "olco3"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        sys.stderr.write(f"relaxsgd: error: {message} (see 'relaxsgd {self.prog.split()[-1]}"
                         " --help')\n")
        raise SystemExit(2)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file; the flags below override it")
    p.add_argument("--task", help="task name (see 'relaxsgd list')")
    p.add_argument("--workers", type=int, help="number of workers n")
    p.add_argument("--topology", help="graph for decentralized algorithms")
    p.add_argument("--network", help="network profile: datacenter, cloud, wan, mobile, custom")
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
    p.add_argument("--step-time", type=float, help="virtual seconds per local step "
                   "(default: measured)")
    p.add_argument("--out", help="output folder (default: runs/<time>-<algo>-<task>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any option: algo.p=8, task.model=cnn, split.alpha=0.1, "
                        "train.momentum=0.9, network.latency_s=0.05, ...")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="relaxsgd", description="Communication-efficient distributed training:"
                 " SwarmSGD, OLCO3 and their baselines, simulated or on torch.distributed.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="train one algorithm")
    r.add_argument("--algo", help="algorithm name (see 'relaxsgd list')")
    _common(r)
    c = sub.add_parser("compare", help="train several algorithms on the same setting; one "
                       "table and one set of plots",
                       description="Train several algorithms on the same setting. Without "
                       "--config, the embedded default job fills in what the flags leave "
                       "unset: MNIST-1D with its CNN, 16 workers, the wan profile, 50 ms of "
                       "virtual time per local step, 30 epochs, lr 0.1, momentum 0.9, and "
                       "per-algorithm options (localsgd p=8; swarm H=4 with an 8-bit "
                       "lattice; olco3 p=8, s=2, top-k 1% through a parameter server). "
                       "--set <algo>.<key>=value sets one algorithm's option.")
    c.add_argument("--algos", help="comma-separated algorithm names (default: "
                   + ",".join(DEFAULT_COMPARE) + ", those available)")
    _common(c)
    sub.add_parser("list", help="every registered plug-in with a one-line description")
    return ap


def config_dict(args: argparse.Namespace, algo: str | None) -> dict[str, Any]:
    """The raw config dict: file, then flags, then --set items."""
    from .run import algorithm_options, task_options

    d: dict[str, Any] = load_yaml(args.config) if args.config else {}
    if not isinstance(d, dict):
        raise ConfigError(f"config file {args.config!r} must hold a mapping of keys to values")
    flags = {"algo": algo, "task": args.task, "workers": args.workers,
             "topology": args.topology, "network": args.network, "steps": args.steps,
             "epochs": args.epochs, "split": args.split, "seed": args.seed,
             "data_dir": args.data_dir, "runtime": args.runtime, "evals": args.evals,
             "out": args.out}
    for k, v in flags.items():
        if v is not None:
            d[k] = v
    if args.steps is not None:
        d.pop("epochs", None)
    if args.epochs is not None:
        d.pop("steps", None)
    train = d.setdefault("train", {}) or {}
    d["train"] = train
    if args.batch_size is not None:
        train["batch_size"] = args.batch_size
    if args.lr is not None:
        train["lr"] = args.lr
    if args.step_time is not None:
        d.setdefault("compute", {})["step_time_s"] = args.step_time
    names = {"algo": algorithm_options(d.get("algo", "localsgd")),
             "task": task_options(d.get("task", "mnist1d"))}
    for item in args.set:
        apply_set(d, item, names)
    return d


def cmd_run(args: argparse.Namespace) -> int:
    from .report import summary_table
    from .run import run

    cfg = from_dict(config_dict(args, args.algo))
    if cfg.out is None:  # dist: only rank 0 writes there
        from .run import default_out_dir

        cfg = dataclasses.replace(cfg, out=default_out_dir(cfg))
    result = run(cfg, progress=not args.quiet)
    if result is not None:
        print(summary_table([result]))
        print(f"outputs in {cfg.out}")
    return 0


# The embedded default job of `relaxsgd compare` (the README's first command): MNIST-1D
# (generated), its 1-D CNN, 16 workers over a WAN, each local step taking 50 ms of virtual
# time (a mid-size model on a GPU), so that compute and communication are of one order.
DEFAULT_JOB: dict[str, Any] = {
    "task": "mnist1d", "task_options": {"model": "cnn", "num_samples": 10000},
    "workers": 16, "network": "wan", "epochs": 30, "split": "iid", "evals": 15,
    "compute": {"step_time_s": 0.05},
    "train": {"lr": 0.1, "momentum": 0.9},
}
DEFAULT_JOB_OPTIONS: dict[str, dict[str, Any]] = {
    "localsgd": {"p": 8},
    "swarm": {"H": 4, "quantizer": "lattice", "bits": 8},
    "olco3": {"p": 8, "s": 2, "compressor": "topk:ratio=0.01", "aggregation": "ps"},
}


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


def _task_optimizer(task: Any) -> str:
    """The local optimizer a task trains with by default (its TRAIN_DEFAULTS)."""
    from .tasks import TASKS

    if not isinstance(task, str) or task not in TASKS:
        return "sgd"
    return str(getattr(TASKS.module(task), "TRAIN_DEFAULTS", {}).get("optimizer", "sgd"))


def cmd_compare(args: argparse.Namespace) -> int:
    import csv

    from .algorithms import ALGORITHMS
    from .config import _typed, parse_value
    from .report import plot_runs, summary_table
    from .run import default_out_dir, run

    if args.algos:
        algos = [a.strip() for a in args.algos.split(",") if a.strip()]
        for a in algos:
            ALGORITHMS.entry(a)  # unknown name: one line with the choices
    else:
        algos = [a for a in DEFAULT_COMPARE if a in ALGORITHMS]
    shared, per = _per_algorithm_sets(args.set, algos)
    args.set = [s for s in shared if not s.startswith("algo.")]
    common_algo = [s for s in shared if s.startswith("algo.")]
    base = config_dict(args, algos[0])
    if not args.config:
        for k, v in DEFAULT_JOB.items():
            if k == "epochs" and base.get("steps") is not None:
                continue  # --steps given: the job's run length is the user's
            if k == "train" and _task_optimizer(base.get("task")) != "sgd":
                continue  # the job's SGD settings do not fit a task trained with AdamW
            if isinstance(v, dict):
                base[k] = {**v, **(base.get(k) or {})}
            else:
                base.setdefault(k, v)
        if args.task and args.task != DEFAULT_JOB["task"]:
            base["task_options"] = {k: v for k, v in base["task_options"].items()
                                    if k not in DEFAULT_JOB["task_options"]}
    out = base.get("out") or default_out_dir(from_dict({**base, "algo": "compare"}))
    configs = []
    for a in algos:
        opts = dict(DEFAULT_JOB_OPTIONS.get(a, {})) if not args.config else {}
        if a == algos[0]:
            opts.update(base.get("algo_options") or {})
        for item in common_algo + per[a]:
            key, _, text = item[len("algo."):].partition("=")
            opts[key] = parse_value(text)
        cfg = from_dict({**base, "algo": a, "algo_options": opts, "out": os.path.join(out, a)})
        # every algorithm's options are checked before the first run starts
        _typed(ALGORITHMS.get(a).Config, cfg.algo_options, f"algorithm {a!r}")
        configs.append(cfg)
    os.makedirs(out, exist_ok=True)
    results, runs = [], []
    for cfg in configs:
        res = run(cfg, progress=not args.quiet)
        if res is None:  # a worker of rank > 0 in --runtime dist: rank 0 writes
            continue
        results.append(res)
        with open(os.path.join(cfg.out, "metrics.csv"), encoding="utf-8") as f:
            runs.append((cfg.algo, list(csv.DictReader(f))))
    if not results:
        return 0
    table = summary_table(results)
    with open(os.path.join(out, "summary.txt"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot_runs(runs, out)
    print(table)
    print(f"outputs in {out} (summary.txt, accuracy_vs_time.png, accuracy_vs_bytes.png)")
    return 0


def cmd_list() -> int:
    from .algorithms import ALGORITHMS
    from .sim.network import PROFILE_DESCRIPTIONS
    from .tasks import TASKS

    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("algorithms", [(e.name, e.description) for e in ALGORITHMS.entries()]),
        ("tasks", [(e.name, e.description) for e in TASKS.entries()]),
        ("network profiles", list(PROFILE_DESCRIPTIONS.items())
         + [("custom", "cloud's numbers with network.latency_s/bandwidth_Bps/... set")]),
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "run":
            return cmd_run(args)
        if args.cmd == "compare":
            return cmd_compare(args)
        return cmd_list()
    except RelaxError as e:
        sys.stderr.write(f"relaxsgd: error: {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("relaxsgd: interrupted; the outputs written so far are kept\n")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
