"""Does the simulator predict real runs? Real dist runs in the network lab next to the
simulator's prediction from a profile calibrated on the same lab; and its own scale.

Modes (run as root for the lab ones):

    python benchmarks/sim_fidelity.py              # the fidelity table (lab; ~30 min)
    python benchmarks/sim_fidelity.py --quick      # every cell, 60 steps (~20 min)
    python benchmarks/sim_fidelity.py --gloo       # gloo collective times in the lab
    python benchmarks/sim_fidelity.py --forwarder  # the delay forwarder's rate and CPU
    python benchmarks/sim_fidelity.py --scale      # 256 and 1024 simulated workers

Fidelity: for a shaped link (25 ms one way, 80 Mbit/s per worker uplink) and an unshaped
control (the forwarder alone, no delay, no rate limit), with 2 and 4 workers: ``relaxsgd
calibrate`` in the lab writes a profile; each algorithm (allreduce, localsgd p=8, swarm,
olco3 p=8 s=2, diloco p=8) runs for real in the lab (``--runtime dist``; its wall time
after start-up, ``final.virtual_time_s``) and in the simulator with ``--network FILE
--compute FILE``, each codec charged its own calibrated cost (``compute.codec: on``) and
the step time's spread within a synchronous round calibrate measured
(``compute.heterogeneity: calibrated``). Then, robust to the load of a shared machine,
each run is predicted again from its own measurements ('own'): the step time the real
run measured; for the algorithms whose workers meet in rounds (all-reduce SGD, Local SGD,
OLCO3 at its server, DiLoCo) the spread of its workers' compute within its rounds and its
work between rounds; for SwarmSGD each worker's own step time and the lattice's cost per
element as the run paid it; all from the run's trace
(``distkit``'s ``RELAXSGD_BENCH_TRACE``, :mod:`sync_trace`); the real run and its
own-step prediction are made one after the other, algorithm by algorithm. Printed: both
times, predicted/real, and each algorithm's throughput relative to all-reduce SGD, real
and predicted. Goal: 0.8-1.25 and within 20%.

The machine's load (``os.getloadavg``) is printed with every table: on a shared machine
the real times move with it; the simulator's do not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

RELAX = [sys.executable, "-m", "relaxsgd.cli"]
HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(HERE, "..", "tests")
# the real runs: relaxsgd run with distkit's hooks (the trace), tests/ on the path
DISTKIT = [sys.executable, "-m", "distkit"]
# the workers meet in rounds (one blocking wait a round: split by the trace): the
# collectives', DiLoCo's outer all-reduce, OLCO3's server round (its wait is for the reply
# of s rounds before)
SYNC = ("allreduce", "localsgd", "olco3", "diloco")
CODEC_ON = ["--set", "compute.codec=on"]
TASK = ["--task", "mnist1d", "--batch-size", "32", "--set", "eval_samples=200"]
ALGOS: list[tuple[str, list[str]]] = [
    ("allreduce", []),
    ("localsgd", ["--set", "algo.p=8"]),
    ("swarm", []),
    ("olco3", ["--set", "algo.p=8", "--set", "algo.s=2"]),
    ("diloco", ["--set", "algo.p=8"]),
]
LINKS = {"shaped": ["--latency", "0.025", "--rate", "80e6"], "unshaped": []}


def load() -> str:
    a, b, c = os.getloadavg()
    return f"load average {a:.2f} {b:.2f} {c:.2f} on {os.cpu_count()} cores"


def _env(trace: str | None = None) -> dict[str, str]:
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path,
            **({"RELAXSGD_BENCH_TRACE": trace} if trace else {})}


def lab(n: int, link: str, cmd: list[str], timeout: float = 1800,
        trace: str | None = None) -> dict[str, Any]:
    """Run ``cmd`` (a relaxsgd subcommand; through distkit, traced into ``trace``, when
    given) on n lab workers; the forwarder's statistics."""
    stats = tempfile.mktemp(suffix=".json")
    inner = DISTKIT if trace else RELAX
    r = subprocess.run([*RELAX, "lab", "--workers", str(n), *LINKS[link], "--stats", stats,
                        "--", *inner, *cmd], capture_output=True, text=True,
                       timeout=timeout, env=_env(trace))
    if r.returncode != 0:
        raise RuntimeError(f"lab run failed ({r.returncode}): {r.stderr[-1500:]}")
    with open(stats, encoding="utf-8") as f:
        return json.load(f)


def result(out: str) -> dict[str, Any]:
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        return json.load(f)


def fidelity(n: int, link: str, steps: int, work: str) -> list[dict[str, Any]]:
    prof = os.path.join(work, f"{link}-n{n}.yaml")
    lab(n, link, ["calibrate", *TASK, "--out", prof])
    rows = []
    for algo, opts in ALGOS:
        common = _common(algo, opts, n, steps)
        real_out = os.path.join(work, f"real-{link}-n{n}-{algo}")
        lab(n, link, ["run", "--runtime", "dist", *common, "--out", real_out],
            trace=real_out + "-trace")
        sim_out = os.path.join(work, f"sim-{link}-n{n}-{algo}")
        _sim([*common, "--network", prof, "--compute", prof, *CODEC_ON, "--set",
              "compute.heterogeneity=calibrated", "--out", sim_out])
        rows.append(compare_run(real_out, sim_out, common, prof, n))
        print(f"  {link} n={n} {algo}: real {rows[-1]['real_s']:.2f} s, "
              f"sim {rows[-1]['sim_s']:.2f} s ({load()})", file=sys.stderr, flush=True)
    return rows


def _common(algo: str, opts: list[str], n: int, steps: int) -> list[str]:
    return [*TASK, "--algo", algo, "--workers", str(n), "--steps", str(steps), "--evals",
            "1", "-q", *opts]


def resim(n: int, link: str, steps: int, work: str) -> list[dict[str, Any]]:
    """The rows of runs already made in ``work`` (the simulator is run again)."""
    prof = os.path.join(work, f"{link}-n{n}.yaml")
    rows = []
    for algo, opts in ALGOS:
        real_out = os.path.join(work, f"real-{link}-n{n}-{algo}")
        if not os.path.exists(os.path.join(real_out, "result.json")):
            continue
        sim_out = os.path.join(work, f"sim-{link}-n{n}-{algo}")
        _sim([*_common(algo, opts, n, steps), "--network", prof, "--compute", prof,
              *CODEC_ON, "--set", "compute.heterogeneity=calibrated", "--out", sim_out])
        rows.append(compare_run(real_out, sim_out, _common(algo, opts, n, steps), prof, n))
    return rows


def _sim(args: list[str]) -> None:
    # (--force: --resim writes the simulator's outputs again into the same folders)
    r = subprocess.run([*RELAX, "run", *args, "--force"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"simulation failed ({r.returncode}): {r.stderr[-1500:]}")


def own_spread(real_out: str, algo: str, n: int) -> tuple[float, float] | None:
    """(sigma, work between collectives / timed steps) of a traced synchronous run."""
    sys.path.insert(0, HERE)
    from sync_trace import run_spread

    trace = real_out + "-trace"
    if algo not in SYNC or not os.path.exists(os.path.join(trace, "run0-rank0.json")):
        return None
    return run_spread(trace, 0, n)


def own_codec(real_out: str, prof: str, n: int) -> str:
    """The profile with the lattice's cost per element as the traced run paid it
    (SwarmSGD), else ``prof`` itself."""
    sys.path.insert(0, HERE)
    from sync_trace import run_lattice_costs, with_lattice_costs

    trace = real_out + "-trace"
    if not os.path.exists(os.path.join(trace, "run0-rank0.json")):
        return prof
    paid = run_lattice_costs(trace, 0, n)
    return with_lattice_costs(prof, paid, real_out + "-profile.yaml") if paid else prof


def compare_run(real_out: str, sim_out: str, common: list[str], prof: str,
                n: int) -> dict[str, Any]:
    """One row: the real run, the simulator from the profile, and the simulator with the
    step time the real run measured, and its own spread (which separates the network
    model's error from the machine's CPU contention)."""
    real, sim = result(real_out), result(sim_out)
    steps = real["dist"]["step_time_s_per_worker"]
    own = sum(steps.values()) / len(steps)
    spread = own_spread(real_out, real["algorithm"], n)
    # round-based: the run's own spread; else each worker's own step in the run (an
    # asynchronous run ends with its last worker)
    factors = ",".join(f"{steps[r] / own:.6g}" for r in sorted(steps, key=int))
    het = ["--set", "compute.heterogeneity=fixed", "--set",
           f"compute.speed_factors=[{factors}]"] if spread is None else [
        "--set", "compute.heterogeneity=jitter", "--set", f"compute.sigma={spread[0]:.6g}"]
    if spread is not None:
        own *= spread[1]
    own_out = sim_out + "-own-step"
    own_prof = own_codec(real_out, prof, n)
    _sim([*common, "--network", prof, "--step-time", str(own), "--set",
          f"compute.profile={own_prof}", *CODEC_ON, *het, "--out", own_out])
    return {"algo": real["algorithm"], "real_s": real["final"]["virtual_time_s"],
            "sim_s": sim["final"]["virtual_time_s"],
            "own_s": result(own_out)["final"]["virtual_time_s"],
            "cal_step_ms": sim["step_time_s"] * 1e3, "real_step_ms": own * 1e3,
            "sigma": spread[0] if spread else None,
            "startup_s": real["dist"]["startup_s"].get("total_s")}


def print_fidelity(table: dict[tuple[str, int], list[dict[str, Any]]], steps: int,
                   load0: str) -> None:
    print(f"\nmnist1d MLP, batch 32, {steps} local steps per worker; times after start-up; "
          f"at the start {load0}; at the end {load()}")
    head = (f"{'link':<9} {'n':>2} {'algorithm':<10} {'real s':>7} {'sim s':>7} "
            f"{'sim/real':>8} {'real xAR':>8} {'sim xAR':>7} {'step ms cal/real':>16} "
            f"{'own sim/real':>12} {'own xAR':>7} {'sigma':>5} {'start-up s':>10}")
    print(head)
    print("-" * len(head))
    cells = {"sim": [0, 0], "own": [0, 0]}  # [within 0.8-1.25, xAR within 20%]
    total = 0
    for (link, n), rows in table.items():
        ar = rows[0]
        for r in rows:
            xr, xs = ar["real_s"] / r["real_s"], ar["sim_s"] / r["sim_s"]
            xo = ar["own_s"] / r["own_s"]
            total += 1
            for k, ratio, x in (("sim", r["sim_s"] / r["real_s"], xs),
                                ("own", r["own_s"] / r["real_s"], xo)):
                cells[k][0] += 0.8 <= ratio <= 1.25
                cells[k][1] += abs(x / xr - 1) <= 0.2
            su = f"{r['startup_s']:.1f}" if r["startup_s"] is not None else "?"
            sig = f"{r['sigma']:.2f}" if r.get("sigma") is not None else "fixed"
            steps = f"{r['cal_step_ms']:.2f}/{r['real_step_ms']:.2f}"
            print(f"{link:<9} {n:>2} {r['algo']:<10} {r['real_s']:>7.2f} {r['sim_s']:>7.2f} "
                  f"{r['sim_s'] / r['real_s']:>8.2f} {xr:>8.2f} {xs:>7.2f} {steps:>16} "
                  f"{r['own_s'] / r['real_s']:>12.2f} {xo:>7.2f} {sig:>5} {su:>10}")
    print("'sim': the simulator from the calibrated profile (its step, its spread: "
          "heterogeneity calibrated, each codec's own cost); 'own': from the real run's "
          "own step time ('real' step ms; the algorithms whose workers meet in rounds: "
          "scaled to the work between rounds) and spread ('sigma', from its trace; "
          "'fixed': each worker's own step), and the lattice's cost as the run paid it "
          "(SwarmSGD's trace); "
          "xAR: all-reduce SGD's time over the algorithm's")
    for k, (ok, xok) in cells.items():
        print(f"{k}: {ok} of {total} cells within 0.8-1.25, {xok} of {total} with xAR "
              "within 20% of the real")


GLOO = """
import json, sys, torch, torch.distributed as dist
from relaxsgd.lab.calibrate import collective_times
torch.set_num_threads(1)
dist.init_process_group("gloo")
r = collective_times([int(x) for x in sys.argv[1].split(",")], 5)
if dist.get_rank() == 0:
    print(json.dumps({"n": dist.get_world_size(), **r}), flush=True)
dist.destroy_process_group()
"""


def gloo_table() -> None:
    """gloo all-reduce/all-gather times, L = 25 ms (the source of sim/collectives.py)."""
    print(f"gloo collectives in the lab, one-way latency 25 ms; median of 5; {load()}")
    for n, rate, sizes in [(2, "0", "8,1024,65536"), (3, "0", "8,1024,65536"),
                           (4, "0", "8,1024,65536"), (8, "0", "8,1024,65536"),
                           (2, "80e6", "1048576,4194304"), (4, "80e6", "1048576,4194304")]:
        r = subprocess.run([*RELAX, "lab", "--workers", str(n), "--latency", "0.025",
                            "--rate", rate, "--", sys.executable, "-c", GLOO, sizes],
                           capture_output=True, text=True, timeout=900)
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if line:
            d = json.loads(line[0])
            for kind in ("allreduce", "allgather"):
                cells = " ".join(f"{int(b)} B: {t:.3f} s ({t / 0.025:.1f} L)"
                                 for b, t in d[kind])
                print(f"n={n} rate={rate:>5} {kind:<9} {cells}", flush=True)


BULK = """
import socket, sys, time
if sys.argv[1] == "server":
    s = socket.create_server((sys.argv[2], 5002)); c, _ = s.accept(); n = 0
    while True:
        d = c.recv(1 << 20)
        if not d: break
        n += len(d)
else:
    for _ in range(100):
        try:
            c = socket.create_connection((sys.argv[2], 5002)); break
        except OSError:
            time.sleep(0.05)
    buf = bytes(1 << 20); t = time.perf_counter(); sent = 0
    while time.perf_counter() - t < float(sys.argv[3]):
        c.sendall(buf); sent += len(buf)
    c.close(); print(sent * 8 / (time.perf_counter() - t) / 1e6)
"""


def forwarder_table() -> None:
    """Sustained rate and CPU of the delay forwarder: one TCP stream for 8 s."""
    from relaxsgd.lab.netlab import Lab, LinkSpec

    print(f"delay forwarder, one TCP stream for 8 s between 2 lab workers; {load()}")
    print(f"{'latency':>8} {'rate limit':>11} {'Mbit/s':>8} {'fwd CPU %':>9} "
          f"{'pkts/s':>8} {'late mean ms':>12} {'late max ms':>11}")
    for lat, rate in [(0.025, 80e6), (0.025, 0.0), (0.0, 0.0)]:
        with Lab(2, LinkSpec(latency_s=lat, rate_bps=rate)) as lb:
            srv = lb.spawn(1, [sys.executable, "-c", BULK, "server", lb.address(1)])
            cli = lb.spawn(0, [sys.executable, "-c", BULK, "client", lb.address(1), "8"],
                           stdout=subprocess.PIPE, text=True)
            mbit = float(cli.communicate(timeout=120)[0])
            srv.wait(timeout=30)
        st = lb.forwarder_stats()
        cpu = 100 * st["cpu_s"] / st["wall_s"]
        pps = st["packets"] / st["wall_s"]
        late = 1e3 * st["late_sum_s"] / max(st["packets"], 1)
        print(f"{lat * 1e3:>6.0f}ms {rate / 1e6:>8.0f} Mb {mbit:>8.1f} {cpu:>9.1f} "
              f"{pps:>8.0f} {late:>12.3f} {st['late_max_s'] * 1e3:>11.2f}", flush=True)


def rss_mb() -> float:
    """This process's resident memory now, MB (Linux)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scale_table(quick: bool) -> None:
    """256 and 1024 simulated workers: worker-steps/s against the no-protocol limit, and
    the resident memory each simulated worker adds (current RSS with the finished run
    still held, minus before it, over n)."""
    import gc

    import torch

    from relaxsgd.config import from_dict
    from relaxsgd.run import prepare, simulate
    sys.path.insert(0, os.path.dirname(__file__))
    from sim_overhead import limit_rate

    torch.set_num_threads(1)
    print(f"simulator scale; worker-steps/s; ratio = simulator / tight loop; {load()}")
    print(f"{'model':<8} {'n':>5} {'algorithm':<9} {'steps':>5} {'limit':>8} {'sim':>8} "
          f"{'ratio':>6} {'MB/worker':>9}")
    for label, task, opts in [("logreg", "logreg", {"n_train": 20000, "n_test": 500}),
                              ("mlp", "mnist1d", {"model": "mlp", "num_samples": 40000})]:
        for n in [256, 1024]:
            steps = 6 if quick else 12
            for algo in ["swarm", "allreduce"]:
                cfg = from_dict({"algo": algo, "task": task, "task_options": opts,
                                 "workers": n, "steps": steps, "evals": 1,
                                 "eval_samples": 200, "network": "cloud",
                                 "train": {"batch_size": 16, "lr": 0.05}})
                gc.collect()
                rss0 = rss_mb()
                out = simulate(prepare(cfg))
                per = (rss_mb() - rss0) / n
                rate = n * steps / out.engine_wall_s
                limit = limit_rate(cfg)
                print(f"{label:<8} {n:>5} {algo:<9} {steps:>5} {limit:>8.0f} {rate:>8.0f} "
                      f"{rate / limit:>6.2f} {per:>9.3f}", flush=True)
                del out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gloo", action="store_true")
    ap.add_argument("--forwarder", action="store_true")
    ap.add_argument("--scale", action="store_true")
    ap.add_argument("--steps", type=int, help="local steps per worker (default 200, "
                    "quick 60)")
    ap.add_argument("--work", default=None, help="folder for profiles and runs")
    ap.add_argument("--cases", default=None, help="link:n pairs, comma-separated (e.g. "
                    "shaped:2,unshaped:2; default: --quick shaped:2, else all four)")
    ap.add_argument("--algos", default=None, help="a comma-separated subset of "
                    + ",".join(a for a, _ in ALGOS) + " (all-reduce SGD is always run: "
                    "the xAR columns)")
    ap.add_argument("--resim", action="store_true", help="only the table, from the real "
                    "runs and profiles already in --work (re-running the simulator)")
    args = ap.parse_args()
    if args.gloo:
        return gloo_table()
    if args.forwarder:
        return forwarder_table()
    if args.scale:
        return scale_table(args.quick)
    if args.algos:
        keep = {"allreduce", *args.algos.split(",")}
        unknown = keep - {a for a, _ in ALGOS}
        if unknown:
            raise SystemExit(f"--algos: unknown {', '.join(sorted(unknown))}; choose from "
                             + ",".join(a for a, _ in ALGOS))
        ALGOS[:] = [(a, o) for a, o in ALGOS if a in keep]
    steps = args.steps or (60 if args.quick else 200)
    work = args.work or tempfile.mkdtemp(prefix="sim-fidelity-")
    os.makedirs(work, exist_ok=True)  # a --work folder that is not there yet
    cases = [("shaped", 2), ("shaped", 4), ("unshaped", 2), ("unshaped", 4)]
    if args.cases:
        try:
            cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
        except (IndexError, ValueError):
            raise SystemExit(f"--cases {args.cases!r}: give link:n pairs such as "
                             "shaped:2,unshaped:4") from None
        if any(link not in ("shaped", "unshaped") or n < 2 for link, n in cases):
            raise SystemExit(f"--cases {args.cases!r}: link is shaped or unshaped, n >= 2")
    table = {}
    t, load0 = time.perf_counter(), load()
    for link, n in cases:
        table[(link, n)] = (resim(n, link, steps, work) if args.resim
                            else fidelity(n, link, steps, work))
        if not table[(link, n)]:
            del table[(link, n)]
    print_fidelity(table, steps, load0)
    print(f"({time.perf_counter() - t:.0f} s; runs and profiles in {work})")


if __name__ == "__main__":
    main()
