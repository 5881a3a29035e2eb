"""What churn costs each algorithm on the default job: time to 0.96 with and without it.

Runs ``relaxsgd run``'s default job (``relaxsgd.defaults``: MNIST-1D CNN, 16 workers,
``wan``, 50 ms of virtual time per local step, 30 epochs) for each algorithm twice: as
is, and with churn (issue 20): every worker fails at a rate of one per ``--mtbf`` virtual
seconds (600: one per 10 minutes, exponential, drawn from the seed) and comes back
``--downtime`` seconds later (60), taking the model from a live peer at that peer's next
safe point. Prints, per algorithm, the virtual time at which the mean model first reached
``--target`` (0.96; "-" if never), the final accuracy, and the leaves/rejoins. Algorithms
whose membership is ``fixed`` (D-PSGD, Choco-SGD, SGP: see their docstrings) cannot run
with churn and are listed as such. Deterministic (virtual time): the figures do not depend
on the machine, only the wall time does.

    python benchmarks/churn_default_job.py                      # every algorithm: hours
    python benchmarks/churn_default_job.py --algos localsgd,swarm
    python benchmarks/churn_default_job.py --quick --algos localsgd   # 3 epochs: a smoke test
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from relaxsgd.algorithms import ALGORITHMS
from relaxsgd.config import from_dict
from relaxsgd.defaults import algorithm_options, fill_defaults
from relaxsgd.report import time_to_target
from relaxsgd.run import prepare, simulate


def one(algo: str, churn: dict[str, Any] | None, quick: bool, target: float,
        device: str) -> dict[str, Any]:
    """One run of the default job; its time to ``target`` and final figures."""
    d = fill_defaults({"algo": algo, **({"epochs": 3} if quick else {}), "device": device})
    d["algo_options"] = algorithm_options(algo)
    if churn:
        d["elastic"] = {"churn": churn}
    t0 = time.perf_counter()
    out = simulate(prepare(from_dict(d)))
    ev = out.result.get("membership", {}).get("events", [])
    return {"t_target": time_to_target(out.rows, target),
            "acc": out.result["final"]["accuracy_mean_model"],
            "vtime": out.result["final"]["virtual_time_s"],
            "leaves": sum(e["event"] == "leave" for e in ev),
            "rejoins": sum(e["event"] == "rejoin" for e in ev),
            "wall": time.perf_counter() - t0, "status": out.result["status"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", default=",".join(e.name for e in ALGORITHMS.entries()))
    ap.add_argument("--mtbf", type=float, default=600.0, help="per-worker mean time "
                    "between failures, virtual s")
    ap.add_argument("--downtime", type=float, default=60.0, help="virtual s before a "
                    "failed worker rejoins")
    ap.add_argument("--target", type=float, default=0.96)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="3 epochs instead of 30")
    args = ap.parse_args()
    churn = {"mtbf_s": args.mtbf, "downtime_s": args.downtime}
    print(f"{'algorithm':<17} {'to ' + str(args.target) + ' s':>9} {'churn s':>8} "
          f"{'ratio':>6} {'acc':>6} {'acc churn':>9} {'leaves':>6} {'rejoins':>7} "
          f"{'wall s':>7}", flush=True)
    for algo in args.algos.split(","):
        base = one(algo, None, args.quick, args.target, args.device)
        if ALGORITHMS.get(algo).membership == "fixed":
            print(f"{algo:<17} {_s(base['t_target']):>9} {'fixed':>8} {'-':>6} "
                  f"{base['acc']:>6.4f} {'-':>9} {'-':>6} {'-':>7} {base['wall']:>7.0f}",
                  flush=True)
            continue
        ch = one(algo, churn, args.quick, args.target, args.device)
        ratio = (f"{ch['t_target'] / base['t_target']:.2f}"
                 if ch["t_target"] and base["t_target"] else "-")
        print(f"{algo:<17} {_s(base['t_target']):>9} {_s(ch['t_target']):>8} {ratio:>6} "
              f"{base['acc']:>6.4f} {ch['acc']:>9.4f} {ch['leaves']:>6} {ch['rejoins']:>7} "
              f"{base['wall'] + ch['wall']:>7.0f}", flush=True)


def _s(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f}"


if __name__ == "__main__":
    main()
