"""What checkpoints cost: file size, wall time, and the virtual time their barriers add.

For each algorithm, the default job's setting (MNIST-1D CNN, 16 workers, ``wan``, 50 ms of
virtual time per local step; ``--epochs`` shortens it) runs twice side by side in one
process: without checkpoints and with ``checkpoint_every`` local steps. Printed per
algorithm: the number of checkpoints, the size of ``checkpoint.pt`` against ``models.pt``
(the final models: what a checkpoint must hold at least), the wall-time ratio (with /
without: the cost of writing), the virtual-time ratio (the barriers: a checkpoint waits
for every worker and for the aggregations in flight), and whether the final models are
equal (they must be for synchronous algorithms; asynchronous ones may differ, because the
barrier changes who talks to whom when).

    python benchmarks/checkpoint_cost.py                 # 3 epochs (47 steps), every 16 steps
    python benchmarks/checkpoint_cost.py --epochs 1 --every 20 --algos localsgd,olco3
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch

from relaxsgd.config import from_dict
from relaxsgd.defaults import algorithm_options, fill_defaults
from relaxsgd.run import prepare, simulate
from relaxsgd.sim import saving

SAVES = [0]
_save = saving.SimCheckpoints.save


def _counting_save(self: Any, engine: Any) -> None:
    SAVES[0] += 1
    _save(self, engine)


saving.SimCheckpoints.save = _counting_save  # count the checkpoints each run takes

ALGOS = "allreduce,localsgd,olco3,swarm,diloco,adpsgd"


def one(algo: str, epochs: float, every: int | None, out: str) -> tuple[dict[str, Any], float]:
    d = fill_defaults({"algo": algo, "epochs": epochs, "checkpoint_every": every})
    d["algo_options"] = algorithm_options(algo)
    prep = prepare(from_dict(d))
    os.makedirs(out)
    t0 = time.perf_counter()
    res = simulate(prep, out).result
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", default=ALGOS)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--every", type=int, default=16, help="local steps between checkpoints")
    args = ap.parse_args()
    print(f"{'algorithm':<12} {'ckpts':>5} {'ckpt MB':>8} {'models MB':>9} {'wall x':>7} "
          f"{'vtime x':>8} {'same models':>11}")
    for algo in args.algos.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            a, b = os.path.join(tmp, "plain"), os.path.join(tmp, "ckpt")
            ra, wa = one(algo, args.epochs, None, a)
            SAVES[0] = 0
            rb, wb = one(algo, args.epochs, args.every, b)
            n_ck = SAVES[0]
            ck = os.path.join(b, "checkpoint.pt")
            ck_mb = os.path.getsize(ck) / 2**20 if os.path.exists(ck) else 0.0
            mo_mb = os.path.getsize(os.path.join(b, "models.pt")) / 2**20
            same = torch.equal(torch.load(os.path.join(a, "models.pt"), weights_only=True)["X"],
                               torch.load(os.path.join(b, "models.pt"), weights_only=True)["X"])
            vt = rb["final"]["virtual_time_s"] / ra["final"]["virtual_time_s"]
            print(f"{algo:<12} {n_ck:>5} {ck_mb:>8.2f} {mo_mb:>9.2f} {wb / wa:>7.2f} "
                  f"{vt:>8.4f} {str(same):>11}", flush=True)


if __name__ == "__main__":
    main()
