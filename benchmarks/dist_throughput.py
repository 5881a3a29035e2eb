"""Throughput of the distributed runtime against the simulator's prediction of it.

Four worker processes on this machine (gloo over loopback, one torch thread each) train the
small CNN (MNIST when its files are at ../shared/data/mnist, else MNIST-1D's 1-D CNN) with
all-reduce SGD, Local SGD (p = 4), SwarmSGD (defaults: H = 2, non-blocking, complete graph)
and OLCO3 (defaults: p = 4, s = 1, PowerSGD rank 2), plus Pipe-SGD (s = 1: all-reduce
SGD's bytes, each all-reduce overlapping the next step; its stall column shows what the
non-blocking collectives buy). For each it prints the samples per
second measured, and what the simulator predicts for the same run, with

- the network model calibrated on the loopback: gloo all-reduces of 4 B and 4 MB among
  the 4 processes, fitted to the simulator's ring all-reduce cost
  ``2(n-1) * latency + 2(n-1)/n * bytes / bandwidth``;
- the compute model measured on this machine, three ways: the step time of one process
  alone (``measure_step_time``, what the simulator measures by default), that times the
  processes per core (here 4 processes share 2 cores, which the simulator does not model),
  and the step time the workers measured during the distributed run itself;

and the ratio measured / predicted for each. A ratio below 1 is time the simulator does
not model (Python, threads, serialisation, evaluation snapshots, the barrier at the end).

    python benchmarks/dist_throughput.py            # 200 steps per worker
    python benchmarks/dist_throughput.py --quick    # 40 steps per worker

``--wire`` measures instead what issue 10's safe transport costs, side by side in one run:
the same jobs with the wire of before (pickle, no frame MACs: ``src/relaxsgd/distributed/wire.py``
of commit ``LEGACY_COMMIT``, put back by a hook of ``distkit``), with the
current one (tagged encoding, authenticated peers, HMAC-SHA256 per frame) and with TLS
(a throw-away CA made with ``openssl``), interleaved and repeated (``--reps``), the median
samples/s of each:

    python benchmarks/dist_throughput.py --wire --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# the dist runtime's test harness lives in tests/distkit (not shipped with the package)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

MNIST_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")
N = 4
ALGOS = [("allreduce", {}), ("localsgd", {"p": 4}), ("swarm", {}), ("olco3", {}),
         ("pipesgd", {})]  # the last: all-reduce SGD's bytes, overlapped (stall % drops)


def task() -> tuple[str, dict[str, Any], str | None]:
    if os.path.isdir(MNIST_DIR):
        return "mnist", {"model": "cnn", "n_train": 12000, "n_test": 1000}, MNIST_DIR
    return "mnist1d", {"model": "cnn"}, None


def config(algo: str, opts: dict[str, Any], steps: int) -> dict[str, Any]:
    name, topts, data_dir = task()
    return {"algo": algo, "algo_options": opts, "task": name, "task_options": topts,
            "data_dir": data_dir, "steps": steps, "evals": 1, "eval_samples": 200,
            "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9}}


def param_count(cfg: dict[str, Any]) -> int:
    from relaxsgd.config import from_dict
    from relaxsgd.run import prepare

    model = prepare(from_dict({**cfg, "workers": N})).spec.model_fn()
    return sum(p.numel() for p in model.parameters())


# -- calibration of the loopback network ------------------------------------------------
def calibrate_worker(out: str) -> None:
    """One of the 4 calibration processes: time gloo all-reduces of two sizes."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    times = {}
    for numel, reps in ((1, 400), (1 << 20, 20)):
        x = torch.ones(numel)
        for _ in range(5):
            dist.all_reduce(x)
        dist.barrier()
        t = time.perf_counter()
        for _ in range(reps):
            dist.all_reduce(x)
        times[numel * 4] = (time.perf_counter() - t) / reps
    if dist.get_rank() == 0:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def calibrate() -> tuple[float, float]:
    """(latency_s, bandwidth_Bps) of the simulator's ring model, fitted on loopback."""
    from relaxsgd.distributed.launch import LocalJob

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cal.json")
        job = LocalJob([sys.executable, __file__, "--calibrate-worker", out], N)
        codes = job.wait(timeout=120)
        if any(codes):
            raise SystemExit(f"calibration failed: exit statuses {codes}")
        with open(out, encoding="utf-8") as f:
            t = {int(k): v for k, v in json.load(f).items()}
    small, big = sorted(t)
    latency = t[small] / (2 * (N - 1))
    bandwidth = 2 * (N - 1) / N * (big - small) / max(t[big] - t[small], 1e-9)
    return latency, bandwidth


# -- the runs --------------------------------------------------------------------------
def predicted(cfg: dict[str, Any], step_time: float, latency: float,
              bandwidth: float) -> float:
    from relaxsgd.config import from_dict
    from relaxsgd.run import prepare, simulate

    d = {**cfg, "workers": N, "network": "custom", "compute": {"step_time_s": step_time},
         "network_options": {"latency_s": latency, "bandwidth_Bps": bandwidth}}
    res = simulate(prepare(from_dict(d))).result["final"]
    return res["samples_total"] / res["virtual_time_s"]


LEGACY_COMMIT = "b0b4b94"  # the last commit with the pickle wire format
WIRE_ALGOS = [("swarm", {}), ("adpsgd", {}), ("allreduce", {})]  # p2p-heavy, and a control


def message_costs(legacy: str, d: int, rounds: int = 7, iters: int = 200) -> dict[str, float]:
    """Seconds of CPU per message of a d-parameter model, sender and receiver together
    (encode, tag, join, check the tag, decode), in this process, interleaved rounds:
    the wire of before, the current one with each frame tag. Median of ``rounds``."""
    import importlib.util

    import torch

    from relaxsgd.distributed import auth as A
    from relaxsgd.distributed import wire
    from relaxsgd.distributed.transport import HEADER

    spec = importlib.util.spec_from_file_location("legacy_wire", legacy)
    assert spec is not None and spec.loader is not None
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    msg = ("xreq", 12, {"kind": "full", "data": torch.randn(d), "op": "avg", "stale": 3,
                        "seq": 7})

    def before() -> None:
        frames = old.encode(msg)
        old.decode(bytearray(b"".join(bytes(f) for f in frames[1:])))

    def after(mac: Any) -> Any:
        def run() -> None:
            frames = wire.encode(msg)
            header = HEADER.pack(wire.wire_size(frames))
            mac.tag(1, header, frames)
            buf = bytearray(b"".join(bytes(f) for f in frames))
            mac.tag(1, header, [buf])
            wire.check_message(wire.decode(buf))
        return run

    ways = {"before": before, "after, HMAC-SHA256": after(A.FrameMac(b"k" * 32, False))}
    if A.Poly1305 is not None:
        ways["after, Poly1305"] = after(A.FrameMac(b"k" * 32, True))
    got: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for k, fn in ways.items():
            fn()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            got[k].append((time.perf_counter() - t) / iters)
    return {k: statistics.median(v) for k, v in got.items()}


def wire_comparison(steps: int, reps: int, legacy_file: str | None = None) -> None:
    """Samples/s with the wire of before, the current one, and the current one over TLS."""
    from distkit import make_test_certs, run_jobs
    from relaxsgd.algorithms import ALGORITHMS

    algos = [(n, o) for n, o in WIRE_ALGOS if n in ALGORITHMS]
    cfgs = [config(n, o, steps) for n, o in algos]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as d:
        legacy = legacy_file or os.path.join(d, "legacy_wire.py")
        if legacy_file is None:
            src = subprocess.run(["git", "show", f"{LEGACY_COMMIT}:src/relaxsgd/dist/wire.py"],
                                 cwd=root, capture_output=True, text=True, check=True).stdout
            with open(legacy, "w", encoding="utf-8") as f:
                f.write(src)
        modes = {"before (pickle)": {"RELAXSGD_BENCH_LEGACY_WIRE": legacy},
                 "after (safe+MAC)": {}, "after + TLS": make_test_certs(d)}
        got: dict[str, dict[str, list[float]]] = {m: {n: [] for n, _ in algos} for m in modes}
        t0 = time.perf_counter()
        for rep in range(reps):
            for mode, env in modes.items():
                runs = run_jobs(cfgs, N, os.path.join(d, f"{rep}-{len(got[mode])}"),
                                timeout=1800, env={"RELAXSGD_SAVE_MODELS": "0", **env})
                if any(runs[0].codes):
                    raise SystemExit(f"{mode} failed:\n" + "\n".join(runs[0].logs))
                for (algo, _), r in zip(algos, runs, strict=True):
                    f = r.result["final"]
                    got[mode][algo].append(f["samples_total"] / f["virtual_time_s"])
        costs = message_costs(legacy, d=param_count(cfgs[0]))
    name, topts, _ = task()
    print(f"{N} processes, gloo on loopback, {name} {topts['model']}, batch 32, {steps} steps "
          f"per worker, median of {reps} interleaved repetitions (samples/s, all workers)")
    names = list(modes)
    print(f"{'algorithm':<10} " + " ".join(f"{m:>18}" for m in names)
          + f" {'after/before':>12} {'TLS/after':>9}")
    for algo, _ in algos:
        med = [statistics.median(got[m][algo]) for m in names]
        print(f"{algo:<10} " + " ".join(f"{v:>18.0f}" for v in med)
              + f" {med[1] / med[0]:>12.3f} {med[2] / med[1]:>9.3f}")
    print(f"({time.perf_counter() - t0:.0f} s; range over repetitions: "
          + ", ".join(f"{m} {algo} {min(v):.0f}-{max(v):.0f}"
                      for m in names for algo, v in got[m].items() if algo == algos[0][0])
          + ")")
    per_step = N * 32 / statistics.median(got[names[0]][algos[0][0]])  # s per worker step
    print(f"CPU per message of the whole model ({param_count(cfgs[0])} parameters), "
          "sender + receiver, median of interleaved rounds in one process:")
    for k, v in costs.items():
        extra = v - costs["before"]
        print(f"  {k:<20} {v * 1e6:7.0f} us   extra {extra * 1e6:6.0f} us = "
              f"{100 * extra / per_step:4.1f}% of a {per_step * 1e3:.1f} ms worker step "
              "(swarm, H=2: one message sent and one received per step)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 steps per worker, not 200")
    ap.add_argument("--wire", action="store_true",
                    help="compare the wire format of before, the current one, and TLS")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of --wire")
    ap.add_argument("--legacy-wire", metavar="FILE",
                    help=f"the old wire.py (default: git show {LEGACY_COMMIT}:...)")
    ap.add_argument("--calibrate-worker", metavar="OUT", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.calibrate_worker:
        calibrate_worker(a.calibrate_worker)
        return
    if a.wire:
        wire_comparison(40 if a.quick else 200, a.reps, a.legacy_wire)
        return
    import torch

    from distkit import run_jobs
    from relaxsgd.algorithms import ALGORITHMS
    from relaxsgd.config import from_dict
    from relaxsgd.run import measure_step_time, prepare

    torch.set_num_threads(1)
    steps = 40 if a.quick else 200
    algos = [(n, o) for n, o in ALGOS if n in ALGORITHMS]
    cfgs = [config(n, o, steps) for n, o in algos]
    t0 = time.perf_counter()
    latency, bandwidth = calibrate()
    alone = measure_step_time(prepare(from_dict({**cfgs[0], "workers": N})))
    with tempfile.TemporaryDirectory() as d:
        runs = run_jobs(cfgs, N, d, timeout=1800, env={"RELAXSGD_SAVE_MODELS": "0"})
    if any(runs[0].codes):
        raise SystemExit("the distributed runs failed:\n" + "\n".join(runs[0].logs))
    name, topts, _ = task()
    print(f"{N} processes, gloo on loopback, {name} {topts['model']}, batch 32, "
          f"{steps} steps per worker")
    print(f"loopback network (ring all-reduce fit): latency {latency * 1e6:.0f} us, "
          f"bandwidth {bandwidth / 1e9:.2f} GB/s; step time alone {alone * 1e3:.1f} ms")
    cores = os.cpu_count() or 1
    shared = alone * max(1.0, N / cores)
    print(f"CPU bound of this machine ({cores} cores, compute only): "
          f"{min(cores, N) * 32 / alone:.0f} samples/s")
    head = (f"{'algorithm':<10} {'step ms':>7} {'measured':>8} {'pred.alone':>10} "
            f"{'ratio':>5} {'pred.shared':>11} {'ratio':>5} {'pred.run':>8} {'ratio':>5} "
            f"{'stall %':>7} {'MB/worker':>9}")
    print(head)
    print("-" * len(head))
    for (algo, _), cfg, r in zip(algos, cfgs, runs, strict=True):
        f = r.result["final"]
        wall = f["virtual_time_s"]
        measured = f["samples_total"] / wall
        st = r.result["dist"]["step_time_s_per_worker"]
        in_run = sum(st.values()) / len(st)
        preds = [predicted(cfg, s, latency, bandwidth) for s in (alone, shared, in_run)]
        cells = "".join(f" {p:>{w}.0f} {measured / p:>5.2f}"
                        for p, w in zip(preds, (10, 11, 8), strict=True))
        print(f"{algo:<10} {in_run * 1e3:>7.1f} {measured:>8.0f}{cells} "
              f"{100 * f['stall_time_s_mean'] / wall:>7.1f} "
              f"{f['bytes_sent_per_worker_max'] / 1e6:>9.2f}")
    print("samples/s of all workers together; 'step ms': compute time per local step "
          "measured in the run; predictions by the simulator with the step time measured "
          f"alone ({alone * 1e3:.1f} ms), alone x {N}/{cores} processes per core "
          f"({shared * 1e3:.1f} ms), or in the run ('step ms'); ratio = measured / predicted")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
