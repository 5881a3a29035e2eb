"""SwarmSGD's communication and time per local step as the number of workers grows.

Setting: n = 16, 32, 64, 128 workers (``--quick``: 16 and 32), the MNIST-1D MLP
(40-256-256-10, d = 78,858 parameters, 315 KB in float32; generated, no files needed),
iid split, the ``cloud`` network profile (250 us latency, 2 Gbit/s per link), a virtual
step time of 10 ms (``--step-time``), ``--steps`` local steps per worker (default 40),
batch 32. Methods: all-reduce SGD (ring all-reduce of the gradient every step); D-PSGD on
a random 4-regular graph (the model to each of 4 neighbours every step, combine-then-adapt:
communication overlaps the gradient); SwarmSGD on the same graph, H = 2, non-blocking,
unquantized and with the 8-bit lattice quantizer.

Columns: bytes a worker sends per local step (mean over workers; all-reduce counts each
worker's ring traffic, 2(n-1)/n of the gradient), messages per worker per step, pairwise
interactions per worker per step (each side counts), virtual seconds per local step
(the run's virtual time / steps), and stall per step (time parked on communication).

The paper's claim: SwarmSGD's communication per worker and per step stays constant as n
grows. (Ring all-reduce's BYTES per worker are also nearly constant, 2(n-1)/n of the
message; its time is not: 2(n-1) latencies a step.)

    python benchmarks/swarm_scaling.py            # n = 16..128 (~2-4 min, 2 processes)
    python benchmarks/swarm_scaling.py --quick    # n = 16, 32
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import torch

from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate

METHODS = [  # label, algorithm, options, topology
    ("all-reduce SGD", "allreduce", {}, "complete"),
    ("D-PSGD (4-regular)", "dpsgd", {}, "random-regular"),
    ("SwarmSGD H=2 fp32", "swarm", {"H": 2}, "random-regular"),
    ("SwarmSGD H=2 lattice-8", "swarm", {"H": 2, "quantizer": "lattice", "bits": 8},
     "random-regular"),
]


def config(args: argparse.Namespace, n: int, algo: str, opts: dict[str, Any],
           topology: str) -> Any:
    return from_dict({
        "algo": algo, "algo_options": opts, "task": "mnist1d",
        "task_options": {"model": "mlp", "num_samples": 4000}, "workers": n,
        "steps": args.steps, "evals": 1, "network": "cloud", "split": "iid",
        "topology": topology, "topology_options": {"degree": 4} if topology ==
        "random-regular" else {}, "compute": {"step_time_s": args.step_time},
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9}, "seed": 0})


def one(job: tuple[argparse.Namespace, int, str, str, dict[str, Any], str]) -> dict[str, Any]:
    args, n, label, algo, opts, topo = job
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out = simulate(prepare(config(args, n, algo, opts, topo)))
    f, steps = out.result["final"], out.result["final"]["steps_per_worker"]
    return {"n": n, "label": label, "bytes": f["bytes_per_worker_per_step"],
            "msgs": f["messages_total"] / n / steps,
            "inter": (f.get("interactions_per_worker") or 0.0) / steps,
            "t_step": f["virtual_time_s"] / steps, "stall": f["stall_time_s_mean"] / steps,
            "fails": f.get("decode_failures") or 0, "acc": f["accuracy_mean_model"],
            "wall": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n = 16, 32 and fewer steps")
    ap.add_argument("--steps", type=int, default=None, help="local steps per worker")
    ap.add_argument("--step-time", type=float, default=0.01, help="virtual s per local step")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    args.steps = args.steps or (20 if args.quick else 40)
    ns = [16, 32] if args.quick else [16, 32, 64, 128]
    jobs = [(args, n, label, algo, opts, topo) for label, algo, opts, topo in METHODS
            for n in ns]
    jobs.sort(key=lambda j: -j[1])  # largest first: better packing over processes
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("fork")) as ex:
            results = list(ex.map(one, jobs))
    else:
        results = [one(j) for j in jobs]
    by = {(r["label"], r["n"]): r for r in results}
    print(f"# Communication per worker as n grows: MNIST-1D MLP (d = 78,858), cloud, "
          f"{args.step_time * 1000:.0f} ms/step, {args.steps} local steps per worker\n")
    head = (f"{'method':<24} {'n':>4} {'bytes/wkr/step':>15} {'msgs/wkr/step':>14} "
            f"{'inter/wkr/step':>15} {'virt s/step':>12} {'stall s/step':>13} {'fails':>6}")
    print(head)
    print("-" * len(head))
    for label, *_ in METHODS:
        for n in ns:
            r = by[(label, n)]
            print(f"{label:<24} {n:>4} {r['bytes']:>15,.0f} {r['msgs']:>14.2f} "
                  f"{r['inter']:>15.3f} {r['t_step']:>12.5f} {r['stall']:>13.5f} "
                  f"{r['fails']:>6.0f}")
    print(f"\nratio n={ns[-1]} / n={ns[0]}:")
    for label, *_ in METHODS:
        a, b = by[(label, ns[0])], by[(label, ns[-1])]
        print(f"  {label:<24} bytes/worker/step x{b['bytes'] / a['bytes']:.3f}   "
              f"virtual time/step x{b['t_step'] / a['t_step']:.3f}")
    print(f"\n({len(jobs)} runs, wall time {time.perf_counter() - t0:.0f} s with {args.jobs} "
          f"process(es))", file=sys.stderr)


if __name__ == "__main__":
    main()
