"""Where a synchronous round's time goes in the distributed runtime: per rank, per round.

Runs all-reduce SGD and Local SGD (p = 4) as ``benchmarks/dist_throughput.py`` does (4
gloo processes on this machine, the same task and batch), with the ``distkit`` trace hook
(``RELAXSGD_BENCH_TRACE``: every worker records when each local computation ran and when
its main program waited, on the machine's one monotonic clock), and splits each round
``k`` (the k-th blocking collective of every rank) into

- ``compute``: each rank's time from leaving round k-1 to arriving at round k (the local
  steps and the Python around them), its mean over ranks and its max (the last to arrive);
- ``wait for slowest``: a rank's arrival to the last rank's arrival (mean over ranks);
- ``collective``: the last arrival to the mean of the ranks' departures (what the
  collective itself takes once everyone is in);

then the round's period (departure to departure) = max compute + collective. Printed: the
means of each over rounds, the ratio max/mean of the per-rank compute, and the log-normal
sigma that makes the simulator's ``jitter`` heterogeneity wait as long (fitted as
``relaxsgd calibrate`` fits it).

    python benchmarks/sync_trace.py --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

ALGOS = [("allreduce", {}), ("localsgd", {"p": 4})]


def rounds(traces: list[dict]) -> list[dict[str, float]]:
    """Per round (skipping the first, whose start is the run's): the split above."""
    waits = [[w for w in t["wait"]] for t in traces]
    k_max = min(len(w) for w in waits)
    out = []
    for k in range(1, k_max):
        arrive = [w[k][0] for w in waits]
        leave = [w[k][1] for w in waits]
        comp = [w[k][0] - w[k - 1][1] for w in waits]
        last = max(arrive)
        timed = [sum(c[1] - c[0] for c in t["compute"] if w[k - 1][1] <= c[0] < w[k][0])
                 for t, w in zip(traces, waits, strict=True)]
        out.append({"compute_mean": statistics.fmean(comp), "compute_max": max(comp),
                    "wait_slowest": statistics.fmean(last - a for a in arrive),
                    "collective": statistics.fmean(leave) - last,
                    "period": statistics.fmean(leave) - statistics.fmean(w[k - 1][1]
                                                                         for w in waits),
                    "timed": statistics.fmean(timed), "comp": comp})
    return out


def load_traces(folder: str, k: int, n: int) -> list[dict]:
    """The n workers' traces of the k-th run of a ``distkit multi`` job."""
    traces = []
    for r in range(n):
        with open(os.path.join(folder, f"run{k}-rank{r}.json"), encoding="utf-8") as f:
            traces.append(json.load(f))
    return traces


def print_rounds(folder: str, labels: list[str], n: int) -> None:
    """The table of the module doc, one row per run ``k`` named ``labels[k]`` (None: skip)."""
    print(f"{'round split':<16} {'period':>7} {'timed':>6} {'comp mean':>9} "
          f"{'comp max':>8} {'wait slow':>9} {'collect.':>8} {'max/mean':>8} {'sigma':>6} "
          f"{'E[max]/mean':>11}  comp mean by rank")
    for k, label in enumerate(labels):
        if label is None:
            continue
        rs = rounds(load_traces(folder, k, n))
        if not rs:
            continue
        m = {key: statistics.fmean(x[key] for x in rs) * 1e3
             for key in ("period", "timed", "compute_mean", "compute_max", "wait_slowest",
                         "collective")}
        sig = sigma_of_rounds([x["comp"] for x in rs])
        print(f"{label:<16} {m['period']:>7.1f} {m['timed']:>6.1f} {m['compute_mean']:>9.1f} "
              f"{m['compute_max']:>8.1f} {m['wait_slowest']:>9.1f} "
              f"{m['collective']:>8.1f} {m['compute_max'] / m['compute_mean']:>8.2f} "
              f"{sig:>6.3f} {expected_max_factor(n, sig):>11.2f}  by rank: "
              + " ".join(f"{statistics.fmean(x['comp'][r] for x in rs) * 1e3:.1f}"
                         for r in range(n)))
    print("ms per round (the k-th blocking wait of every worker), means over rounds: "
          "'period' departure to departure; 'timed' the local steps; 'comp' leaving the "
          "last round to arriving at this one (mean over workers, and the last to "
          "arrive); 'wait slow' a worker's arrival to the last's; 'collect.' the last "
          "arrival to the departures; 'sigma' the log-normal spread whose E[max of n]/mean "
          "is the rounds' summed slowest over their summed means, 'max/mean' "
          "(relaxsgd.lab.fit.fit_jitter, as calibrate fits it; 'E[max]/mean' of that "
          f"sigma, relaxsgd.sim.compute.expected_max_lognormal, n = {n}: the same); "
          "Pipe-SGD waits for the previous step's all-reduce, so its 'collect.' can be "
          "negative")


def run_spread(folder: str, k: int, n: int) -> tuple[float, float] | None:
    """(sigma of the per-worker compute within a round, mean compute between rounds over
    the mean timed local steps) of the k-th run; None without two rounds. The second
    scales the runtime's step time (the timed steps alone) to all the work between two
    collectives (the optimizer's update after an all-reduce, the Python around)."""
    rs = rounds(load_traces(folder, k, n))
    if not rs:
        return None
    timed = statistics.fmean(x["timed"] for x in rs)
    comp = statistics.fmean(x["compute_mean"] for x in rs)
    return sigma_of_rounds([x["comp"] for x in rs]), comp / timed if timed > 0 else 1.0


def run_cpu(folder: str, k: int, n: int) -> tuple[list[float], float] | None:
    """(each worker's CPU seconds in the k-th run, every thread; the mean number of cores
    the n processes kept busy over the run's wall time), or None without the record."""
    got = [t.get("cpu") for t in load_traces(folder, k, n)]
    if not all(got):
        return None
    return [c[0] for c in got], sum(c[0] for c in got) / max(max(c[1] for c in got), 1e-9)


def run_lattice_costs(folder: str, k: int, n: int) -> tuple[float, float] | None:
    """(encode, decode) seconds per element of the lattice codec as the k-th run paid them
    (every worker's coding, CPU contention included: ``distkit``'s trace times each call),
    or None if it coded nothing."""
    got = [t.get("lattice") for t in load_traces(folder, k, n)]
    if not all(got):
        return None
    costs = []
    for kind in ("encoded", "decoded"):
        elements = sum(g[kind][0] for g in got)
        if elements <= 0:
            return None
        costs.append(sum(g[kind][1] for g in got) / elements)
    return costs[0], costs[1]


def with_lattice_costs(profile: str, costs: tuple[float, float], out: str) -> str:
    """A copy of ``profile`` (at ``out``) whose lattice codec costs are ``costs`` (encode,
    decode seconds per element): what a run itself paid, from its trace."""
    import yaml

    with open(profile, encoding="utf-8") as f:
        prof = yaml.safe_load(f)
    comp = prof["compute"]
    comp["encode_s"], comp["decode_s"] = costs
    comp.setdefault("codecs", {})["lattice"] = {"encode_s": costs[0], "decode_s": costs[1]}
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(prof, f)
    return out


def sigma_of_rounds(comp: list[list[float]]) -> float:
    from relaxsgd.lab.fit import fit_jitter

    return fit_jitter(comp)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args()
    from dist_throughput import N, config
    from distkit import run_jobs

    cfgs = [config(n, o, a.steps) for n, o in ALGOS]
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        trace = os.path.join(d, "trace")
        runs = run_jobs(cfgs, N, os.path.join(d, "runs"), timeout=1800,
                        env={"RELAXSGD_SAVE_MODELS": "0", "RELAXSGD_BENCH_TRACE": trace})
        if any(runs[0].codes):
            raise SystemExit("the runs failed:\n" + "\n".join(runs[0].logs))
        print(f"{N} processes, {a.steps} steps; load {load0:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end")
        print_rounds(trace, [n for n, _ in ALGOS], N)


def expected_max_factor(n: int, sigma: float) -> float:
    """E[max of n] / mean of mean-one log-normal step times of spread sigma."""
    from relaxsgd.sim.compute import expected_max_lognormal

    return expected_max_lognormal(n, sigma)


if __name__ == "__main__":
    main()
