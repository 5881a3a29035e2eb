"""Is a tuned configuration faster for real? Default against tuned, in the network lab and
in the simulator (issue 19's real confirmation).

For each algorithm (SwarmSGD and OLCO3 by default) and each worker count (2 and 4): its
default-job options and the best trial's options of a ``relaxsgd tune`` folder run the
MNIST-1D CNN of the default job for ``--steps`` local steps per worker, each step paced to
the default job's 50 ms (``--step-time 0.05``; the dist runtime sleeps the rest of a
step, so compute is the job's, not this machine's), over a link of 25 ms one way and 80
Mbit/s per worker uplink:

- real: ``relaxsgd lab`` (root; network namespaces at 198.51.100.x) with ``--runtime
  dist``; the time is the run's wall time after start-up (``final.virtual_time_s``);
- simulated: the same flags in the simulator over the same link (``--network custom``,
  latency 0.025 s, 1e7 bytes/s).

Printed: both times for default and tuned, and the speed-up default/tuned, simulated and
real. The tune's objective is the time to an accuracy; a fixed number of steps measures
the part of the gain that comes from time per step (communication), which is what the
lab can confirm in minutes; the learning rate's part (steps to the target) is the same
computation in both runtimes.

    python benchmarks/tune_lab_confirm.py TUNE_DIR [--steps 80] [--workers 2,4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

RELAX = [sys.executable, "-m", "relaxsgd.cli"]
LINK = ["--latency", "0.025", "--rate", "80e6"]
SIM_LINK = ["--network", "custom", "--set", "network.latency_s=0.025",
            "--set", "network.bandwidth_Bps=1e7"]


def tuned_sets(tune: str, algo: str) -> list[str]:
    """--set items of the best trial of ``algo`` in the tune folder."""
    with open(os.path.join(tune, algo, "trial.json"), encoding="utf-8") as f:
        settings = json.load(f)["settings"]
    out = []
    for k, v in settings.items():
        out += ["--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return out


def timed(cmd: list[str], out: str, lab_n: int | None) -> float:
    """Run ``relaxsgd run`` (in the lab with ``lab_n`` workers); its final time."""
    full = [*RELAX, "run", *cmd, "--out", out, "-q"]
    if lab_n:
        full = [*RELAX, "lab", "--workers", str(lab_n), *LINK, "--timeout", "900", "--",
                *full]
    r = subprocess.run(full, capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} failed ({r.returncode}): {r.stderr[-800:]}")
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        return float(json.load(f)["final"]["virtual_time_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tune", help="a relaxsgd tune folder (its <algo>/trial.json)")
    ap.add_argument("--algos", default="swarm,olco3")
    ap.add_argument("--workers", default="2,4")
    ap.add_argument("--steps", type=int, default=80)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tune-lab-")
    print(f"load before: {os.getloadavg()}")
    print(f"{'algo':<7} {'n':>2} {'sim default':>11} {'sim tuned':>9} {'sim x':>6} "
          f"{'real default':>12} {'real tuned':>10} {'real x':>6}")
    for algo in args.algos.split(","):
        tuned = tuned_sets(args.tune, algo)
        for n in (int(k) for k in args.workers.split(",")):
            base = ["--algo", algo, "--workers", str(n), "--steps", str(args.steps),
                    "--step-time", "0.05", "--evals", "2", "--set", "eval_samples=200"]
            t = {}
            for which, sets in (("default", []), ("tuned", tuned)):
                tag = f"{algo}-n{n}-{which}"
                t["sim", which] = timed([*base, *sets, *SIM_LINK],
                                        os.path.join(tmp, tag + "-sim"), None)
                t["real", which] = timed([*base, *sets, "--runtime", "dist"],
                                         os.path.join(tmp, tag + "-real"), n)
            sx = t["sim", "default"] / t["sim", "tuned"]
            rx = t["real", "default"] / t["real", "tuned"]
            print(f"{algo:<7} {n:>2} {t['sim', 'default']:>11.2f} {t['sim', 'tuned']:>9.2f} "
                  f"{sx:>6.2f} {t['real', 'default']:>12.2f} {t['real', 'tuned']:>10.2f} "
                  f"{rx:>6.2f}", flush=True)
    print(f"load after: {os.getloadavg()}; runs in {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
