"""SwarmSGD's lattice quantizer at each bit width: decode failures and bytes.

Setting: 16 workers on a random 4-regular graph, the MNIST-1D MLP (d = 78,858; generated,
no files), iid split, H = 2 (geometric), non-blocking, adaptive eps (the default), batch
32, lr 0.05, momentum 0.9, ``--steps`` local steps per worker (default 60), seed 0, for
bits = 4, 6, 8, 12, 16 (``--bits``). Columns: decode failures per interaction (each
interaction has two messages that may fail), bytes per worker per local step, the share of
those bytes that were full-precision fallbacks, the mean lattice eps, and the mean model's
test accuracy. ``--safety`` overrides the option (default: the library's choice).

    python benchmarks/swarm_lattice_bits.py            # ~1-2 min on 2 idle cores
    python benchmarks/swarm_lattice_bits.py --steps 30 # quicker
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate


def config(bits: int, steps: int, safety: float | None, seed: int) -> Any:
    opts: dict[str, Any] = {"quantizer": "lattice", "bits": bits}
    if safety is not None:
        opts["safety"] = safety
    return from_dict({
        "algo": "swarm", "algo_options": opts, "task": "mnist1d",
        "task_options": {"model": "mlp", "num_samples": 4000}, "workers": 16,
        "steps": steps, "evals": 1, "network": "cloud", "split": "iid",
        "topology": "random-regular", "topology_options": {"degree": 4},
        "compute": {"step_time_s": 0.01}, "seed": seed,
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--bits", default="4,6,8,12,16")
    ap.add_argument("--safety", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'bits':>4} {'fail/inter':>10} {'B/worker/step':>13} {'fallback %':>10} "
          f"{'eps':>9} {'acc mean':>8} {'wall s':>6}")
    for bits in (int(b) for b in args.bits.split(",")):
        t0 = time.perf_counter()
        out = simulate(prepare(config(bits, args.steps, args.safety, args.seed)))
        f = out.result["final"]
        inter = f["interactions_per_worker"] * 16 / 2
        total = f["bytes_sent_total"]
        print(f"{bits:>4} {f.get('decode_failures', 0) / inter:>10.3f} "
              f"{f['bytes_per_worker_per_step']:>13.0f} "
              f"{100 * f.get('fallback_bytes', 0) / total:>10.1f} "
              f"{f['lattice_eps_mean']:>9.2e} {f['accuracy_mean_model']:>8.4f} "
              f"{time.perf_counter() - t0:>6.1f}", flush=True)


if __name__ == "__main__":
    main()
