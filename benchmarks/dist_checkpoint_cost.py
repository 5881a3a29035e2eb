"""What checkpoints cost a distributed run: the same jobs with and without them, side by side.

Two worker processes on this machine (gloo over loopback) train MNIST-1D's CNN with
all-reduce SGD and OLCO3 (its defaults: top-k 1% through a parameter server, p = 4, s = 1),
``--steps`` local steps each, once without checkpoints and once with one every ``--every``
steps, interleaved and repeated (``--reps``), all in the same processes
(:func:`distkit.run_jobs`). It prints the median wall time of each, the cost
per checkpoint (the difference over the number of checkpoints: waiting for what is in
flight, two small all-reduces, writing and fsyncing one file per worker) and the size of a
worker's file.

    python benchmarks/dist_checkpoint_cost.py                 # 400 steps, every 50, 3 reps
    python benchmarks/dist_checkpoint_cost.py --steps 100 --reps 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

# the dist runtime's test harness lives in tests/distkit (not shipped with the package)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from distkit import run_jobs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    base = {"task": "mnist1d", "steps": a.steps, "evals": 2, "eval_samples": 200,
            "train": {"batch_size": 32, "lr": 0.05}}
    algos = {"allreduce": {"algo": "allreduce"}, "olco3": {"algo": "olco3"}}
    cfgs, keys = [], []
    for _ in range(a.reps):
        for name, c in algos.items():
            for every in (None, a.every):
                cfgs.append({**base, **c, "checkpoint_every": every})
                keys.append((name, every))
    with tempfile.TemporaryDirectory() as tmp:
        rs = run_jobs(cfgs, 2, tmp, timeout=60 + 2.0 * a.steps * len(cfgs))
        if rs[0].codes != [0, 0]:
            print("\n".join(rs[0].logs), file=sys.stderr)
            return 1
        wall: dict[tuple, list[float]] = {}
        size: dict[str, int] = {}
        for k, r in zip(keys, rs, strict=True):
            assert r.result is not None and r.result["status"] == "completed"
            wall.setdefault(k, []).append(r.result["final"]["wall_time_s"])
            files = [f for f in os.listdir(r.out) if f.startswith("checkpoint-rank0")]
            if files:
                size[k[0]] = os.path.getsize(os.path.join(r.out, files[0]))
    n_ck = (a.steps - 1) // a.every
    print(f"2 processes, {a.steps} steps each, a checkpoint every {a.every} ({n_ck} per run),"
          f" median of {a.reps}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'algorithm':10} {'no ckpt s':>10} {'ckpt s':>10} {'ratio':>7} {'per ckpt ms':>12} "
          f"{'file KB':>8}")
    for name in algos:
        t0 = statistics.median(wall[(name, None)])
        t1 = statistics.median(wall[(name, a.every)])
        print(f"{name:10} {t0:10.2f} {t1:10.2f} {t1 / t0:7.3f} "
              f"{1000 * (t1 - t0) / max(n_ck, 1):12.1f} {size.get(name, 0) / 1024:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
