"""A character-level transformer language model over a WAN: DiLoCo's setting, here.

Setting: Shakespeare (``../shared/data/shakespeare``), 8 workers (``--workers``), the
``play`` split (each worker its own whole works: the natural non-iid split), the ``wan``
network profile (40 ms one way, 100 Mbit/s per link), a fixed virtual step time
(``--step-time``, default 50 ms), the same number of local steps per worker for every
method, and the task's defaults inside every worker: AdamW (lr 2e-3, betas 0.9/0.99,
weight decay 0.1, 20 warm-up steps, cosine decay), batch 16 windows. The model is smaller
than the task's default so that the whole benchmark fits in ~20 minutes on 2 shared cores:
2 layers, width 64, 4 heads, context 32 (0.1M parameters).

Methods: all-reduce AdamW (every step); Local SGD (average every H steps; AdamW moments
stay local); DiLoCo (Douillard et al. 2023: inner AdamW, outer Nesterov SGD lr 0.7
momentum 0.9) with H in {20, 100}; Streaming DiLoCo (Douillard et al. 2025: 4 fragments,
each synced every 20 steps, 4-bit outer gradients, overlapped by tau = 5 steps); OLCO3
with top-k 1% through a parameter server and with PowerSGD rank 2 (p = 20, s = 1);
SwarmSGD (H = 20 local steps between pairwise averages, 8-bit lattice quantizer).

Columns: final validation bits per character of the mean model and of the workers' own
models (averaged), next-character accuracy of the mean model, virtual time, bytes sent per
worker, the reduction in bytes against all-reduce, and the mean model's bits per character
at equal virtual time (the earliest end among all methods; the last evaluation at or
before it). Main rows (all-reduce, Local SGD and DiLoCo) give mean +- std over 3 seeds.

    nice python benchmarks/lm_wan.py            # full: 16 runs, 23 min with 2 processes
                                                # on 2 cores at load average 10-15
    nice python benchmarks/lm_wan.py --quick    # a smoke version: 40 steps, 1 seed
    nice python benchmarks/lm_wan.py --tune     # DiLoCo tuned by relaxsgd tune against
                                                # all-reduce AdamW (lm_wan_tune.py)
    nice python benchmarks/lm_wan.py --tune --steps 400 --tune-trials 8 --tune-time 28m \
        --jobs 2 --tune-out runs/lm-tune        # the README's run (again: resumes it)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate

# ../shared/data/shakespeare from the project root (a clone next to ../shared), else
# $RELAXSGD_DATA_DIR
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                    "shakespeare")
if not os.path.isdir(DATA):
    DATA = os.environ.get("RELAXSGD_DATA_DIR", DATA)
MODEL = {"d_model": 64, "layers": 2, "heads": 4, "context": 32, "sample_chars": 0}
METHODS: list[tuple[str, str, dict[str, Any], bool]] = [  # label, algo, options, main row
    ("all-reduce AdamW", "allreduce", {}, True),
    ("Local SGD H=20", "localsgd", {"p": 20}, True),
    ("DiLoCo H=20", "diloco", {"p": 20}, True),
    ("DiLoCo H=100", "diloco", {"p": 100}, True),
    ("Streaming DiLoCo H=20 f=4 tau=5", "streaming-diloco",
     {"p": 20, "fragments": 4, "tau": 5}, False),
    ("OLCO3 top-k 1% ps p=20 s=1", "olco3",
     {"p": 20, "s": 1, "compressor": "topk:ratio=0.01", "aggregation": "ps"}, False),
    ("OLCO3 PowerSGD r2 p=20 s=1", "olco3",
     {"p": 20, "s": 1, "compressor": "powersgd:rank=2", "aggregation": "allreduce"}, False),
    ("SwarmSGD H=20 lattice 8b", "swarm", {"H": 20, "quantizer": "lattice", "bits": 8}, False),
]


def config(args: argparse.Namespace, algo: str, opts: dict[str, Any], seed: int) -> Any:
    opts = dict(opts)
    train = opts.pop("_train", {})  # --tune: the tuned inner optimizer's options
    return from_dict({"algo": algo, "algo_options": opts, "task": "shakespeare",
                      "train": train,
                      "task_options": MODEL, "data_dir": args.data_dir,
                      "workers": args.workers, "steps": args.steps, "evals": args.evals,
                      "network": "wan", "split": "play", "seed": seed,
                      "compute": {"step_time_s": args.step_time},
                      "eval_samples": args.eval_samples})


def _one(job: tuple[argparse.Namespace, str, dict[str, Any], int]) -> dict[str, Any]:
    args, algo, opts, seed = job
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = simulate(prepare(config(args, algo, opts, seed)))
    fin = out.result["final"]
    return {"bpc": fin["bpc_mean_model"], "bpc_own": fin["bpc_workers"],
            "acc": fin["accuracy_mean_model"], "vtime": fin["virtual_time_s"],
            "bytes": fin["bytes_sent_total"] / out.result["workers"],
            "curve": [(r["virtual_time_s"], r["bpc_mean_model"]) for r in out.rows],
            "wall": time.perf_counter() - t0}


def at_time(curve: list[tuple[float, float]], t: float) -> float:
    """bits/char of the last evaluation at or before virtual time ``t``."""
    return [b for v, b in curve if v <= t + 1e-9][-1]


def _ms(xs: list[float], fmt: str) -> str:
    if len(xs) == 1:
        return format(xs[0], fmt)
    return f"{format(statistics.mean(xs), fmt)}+-{format(statistics.stdev(xs), fmt)}"


def report(args: argparse.Namespace, res: dict[tuple[str, int], dict[str, Any]]) -> None:
    t_eq = min(r["vtime"] for r in res.values())
    ref = statistics.mean(r["bytes"] for (lab, _), r in res.items()
                          if lab == METHODS[0][0])
    ref_bpc = statistics.mean(r["bpc"] for (lab, _), r in res.items()
                              if lab == METHODS[0][0])
    print(f"# Shakespeare char LM ({MODEL['layers']} layers, width {MODEL['d_model']}, "
          f"context {MODEL['context']}), {args.workers} workers, play split, wan, "
          f"{args.step_time * 1000:.0f} ms/step, {args.steps} local steps, AdamW inside; "
          f"validation: {args.eval_samples} windows")
    head = (f"{'method':<34} {'seeds':>5} {'bpc mean':>13} {'bpc own':>13} {'vs AR':>7} "
            f"{'acc':>6} {'vtime s':>9} {'MB/worker':>10} {'bytes x':>8} "
            f"{'bpc@t=' + format(t_eq, '.0f') + 's':>13}")
    print(head)
    print("-" * len(head))
    for label, _, _, _ in METHODS:
        rs = [r for (lab, _), r in sorted(res.items()) if lab == label]
        if not rs:
            continue
        bpc = [r["bpc"] for r in rs]
        print(f"{label:<34} {len(rs):>5} {_ms(bpc, '.4f'):>13} "
              f"{_ms([r['bpc_own'] for r in rs], '.4f'):>13} "
              f"{100 * (statistics.mean(bpc) / ref_bpc - 1):>+6.1f}% "
              f"{statistics.mean(r['acc'] for r in rs):>6.3f} "
              f"{statistics.mean(r['vtime'] for r in rs):>9.1f} "
              f"{statistics.mean(r['bytes'] for r in rs) / 1e6:>10.2f} "
              f"{ref / max(statistics.mean(r['bytes'] for r in rs), 1):>8.1f} "
              f"{_ms([at_time(r['curve'], t_eq) for r in rs], '.4f'):>13}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 steps, one seed (a smoke test)")
    ap.add_argument("--data-dir", default=DATA)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="local steps per worker")
    ap.add_argument("--step-time", type=float, default=0.05, help="virtual s per local step")
    ap.add_argument("--seeds", type=int, default=None, help="seeds of the main rows")
    ap.add_argument("--eval-samples", type=int, default=128, help="validation windows")
    ap.add_argument("--only", default="", help="comma-separated labels' prefixes to run")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--tune", action="store_true", help="tune DiLoCo (H, inner and outer "
                    "lr, outer momentum) with relaxsgd tune, then compare it with all-reduce "
                    "AdamW over 3 fresh seeds (lm_wan_tune.py)")
    ap.add_argument("--tune-trials", type=int, default=12, help="--tune: DiLoCo trials")
    ap.add_argument("--tune-out", default=None, help="--tune: the tune's folder (given "
                    "again: resume it, and rerun none of the runs already finished)")
    ap.add_argument("--tune-time", default=None, help="--tune: wall-time budget of the "
                    "tune (e.g. 30m), with --tune-trials whichever ends first")
    args = ap.parse_args()
    if not os.path.isfile(os.path.join(args.data_dir, "plays.txt.gz")):
        sys.exit(f"relaxsgd: error: {args.data_dir}/plays.txt.gz not found; pass --data-dir")
    args.steps = args.steps or (40 if args.quick else 300)
    args.evals = 4 if args.quick else 12
    if args.tune:
        from lm_wan_tune import tune_and_compare

        tune_and_compare(args, config, _one)
        return
    seeds = args.seeds or (1 if args.quick else 3)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    jobs = [(label, algo, opts, s) for label, algo, opts, main_row in METHODS
            for s in range(seeds if main_row else 1)
            if not only or any(label.startswith(o) for o in only)]
    t0 = time.perf_counter()
    work = [(args, algo, opts, s) for _, algo, opts, s in jobs]
    pool = ProcessPoolExecutor(max(1, args.jobs), mp_context=get_context("fork"))
    res = {}
    for (label, _, _, s), r in zip(jobs, pool.map(_one, work), strict=True):
        res[(label, s)] = r
        print(f"  [{time.perf_counter() - t0:5.0f}s] {label} seed {s}: bpc {r['bpc']:.4f} "
              f"({r['wall']:.0f}s)", file=sys.stderr, flush=True)
    report(args, res)
    print(f"\n({len(jobs)} runs, wall time {time.perf_counter() - t0:.0f} s with "
          f"{args.jobs} process(es))")


if __name__ == "__main__":
    main()
