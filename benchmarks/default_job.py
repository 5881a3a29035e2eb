"""The default job's accuracy per algorithm, and the OLCO3 options its default was chosen from.

Runs ``relaxsgd run``'s (and ``compare``'s) default job (``relaxsgd.defaults``: MNIST-1D with
its CNN on 10,000 samples, 16 workers, ``wan``, 50 ms of virtual time per local step, 30
epochs, lr 0.1, momentum 0.9; OLCO3's own lr 0.165) for Local SGD, SwarmSGD and OLCO3 with
their defaults, and OLCO3 with the other configurations it was compared with (at the
recipe's lr 0.1, as they were measured): the parameter
server (``ps``) at its real cost, one hop each way (``relaxsgd.sim.server``), against
all-reduce aggregation at gloo's. Deterministic (virtual time), so the figures do not
depend on the machine; the README quotes them.

    python benchmarks/default_job.py          # 13 runs, 10-15 min each on 2 cores under load
    python benchmarks/default_job.py --quick  # 3 epochs: a smoke test of the script
"""

from __future__ import annotations

import argparse
from typing import Any

from relaxsgd.config import from_dict
from relaxsgd.defaults import algorithm_options, fill_defaults
from relaxsgd.run import prepare, simulate

TOPK, TOPK5, TOPK10, PSGD = ("topk:ratio=0.01", "topk:ratio=0.05", "topk:ratio=0.1",
                              "powersgd:rank=2")
R = {"lr": 0.1}  # the recipe's lr: OLCO3's options were compared at it (its own is 0.165)
RUNS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [  # algorithm, options, train
    ("localsgd", {}, {}),
    ("swarm", {}, {}),
    ("olco3", {}, {}),  # the default job's: top-k 10%, ps, p = 4, s = 1, lr 0.165 (tuned)
    ("olco3", {"compressor": TOPK10}, R),  # the default job's until the second tune
    ("olco3", {"compressor": TOPK5}, R),  # the default job's until the first tune
    ("olco3", {"compressor": TOPK5, "s": 0}, R),
    ("olco3", {"compressor": TOPK}, R),  # the module's default: top-k 1%, ps, p = 4, s = 1
    ("olco3", {"compressor": TOPK, "s": 0}, R),
    ("olco3", {"compressor": TOPK, "p": 2}, R),
    ("olco3", {"compressor": TOPK, "p": 8, "s": 2}, R),
    ("olco3", {"compressor": TOPK, "p": 8, "s": 1, "aggregation": "allreduce"}, R),
    ("olco3", {"compressor": PSGD, "p": 4, "s": 1, "aggregation": "allreduce"}, R),
    ("olco3", {"compressor": PSGD, "p": 8, "s": 2, "aggregation": "allreduce"}, R),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 epochs instead of 30")
    args = ap.parse_args()
    print(f"{'algorithm':<10} {'options':<62} {'acc':>6} {'acc w0':>6} {'vtime s':>8} "
          f"{'stall s':>8} {'MB/worker':>9}")
    for algo, opts, train in RUNS:
        d = fill_defaults({"algo": algo, **({"epochs": 3} if args.quick else {}),
                           "train": train})
        d["algo_options"] = {**algorithm_options(algo), **opts}
        opts = {**opts, **({"lr": train["lr"]} if train else {})}
        res = simulate(prepare(from_dict(d))).result
        f = res["final"]
        print(f"{algo:<10} {str(opts or '(defaults)'):<62} {f['accuracy_mean_model']:>6.4f} "
              f"{f['accuracy_worker0']:>6.4f} {f['virtual_time_s']:>8.1f} "
              f"{f['stall_time_s_mean']:>8.1f} "
              f"{f['bytes_sent_total'] / res['workers'] / 1e6:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
