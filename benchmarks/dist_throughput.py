"""Throughput of the distributed runtime against the simulator's prediction of it.

Four worker processes on this machine (gloo over loopback, one torch thread each) train the
small CNN (MNIST when its files are at ../shared/data/mnist, else MNIST-1D's 1-D CNN) with
all-reduce SGD, Local SGD (p = 4), SwarmSGD (its defaults: 8-bit lattice, H = 4 geometric,
non-blocking, complete graph; and unquantized) and OLCO3 (its defaults: top-k 1% through
the parameter server, a thread of worker 0; p = 4, s = 1), plus Pipe-SGD (s = 1: all-reduce
SGD's bytes, each all-reduce overlapping the next step; its stall column shows what the
non-blocking collectives buy). For each it prints the samples per
second measured, and what the simulator predicts for the same run, with

- the network model calibrated on the loopback through the runtime's own path
  (``relaxsgd calibrate`` on the 4 processes: latency, the executor's per-message overhead
  and bandwidth, its all-reduce and all-gather lines);
- the codec time per element (``encode_s``, ``decode_s``) that calibrate measured through
  the real lattice codec, charged where the runtime pays it (``compute.codec: on``);
- the compute model measured on this machine, three ways: the step time of one process
  alone (``measure_step_time``, what the simulator measures by default), that times the
  processes per core (here 4 processes share 2 cores, which the simulator does not model),
  and the step time the workers measured during the distributed run itself;

each with a spread of the step time within a synchronous round (``compute.heterogeneity:
jitter``, a mean-one log-normal factor per local computation: a synchronous round waits for
the slowest of the n): for all-reduce SGD, Local SGD, Pipe-SGD and OLCO3 (whose workers meet
in rounds: OLCO3's at its server) the run's own, from its trace (``distkit``'s
``RELAXSGD_BENCH_TRACE``, :mod:`sync_trace`), with the step scaled to all the work between
the run's collectives; for the others the one ``relaxsgd calibrate`` measured, and in
'pred.run' each worker's own step time in the run (compute.heterogeneity fixed: asynchronous
workers finish apart, and the run with the last); SwarmSGD's 'pred.run' charges the
lattice's cost per element as the run paid it (its trace times every encode and decode: its
handlers code on a thread that shares the cores with the steps); and, in the column 'no
jitter', the ratio to the prediction with every step the mean (what the simulator charged
before). After the table, the trace's split of a synchronous round (compute, the wait for
the slowest, the collective), and the ratio measured / predicted for each. A ratio below 1
is time the simulator does not model (Python, threads, evaluation snapshots, the barrier at
the end). SwarmSGD also runs unquantized ('swarm fp32': what its lattice codec costs where
bytes are nearly free); with ``--before`` all-reduce SGD and SwarmSGD also run as before the
transport's idle-connection fast path (every message handed to a sender thread:
``(before)``), interleaved in the same job. The last lines give the goals: SwarmSGD's
samples/s over all-reduce SGD's (>= 1) and the lowest measured/predicted (>= 0.8).

    python benchmarks/dist_throughput.py            # 200 steps per worker
    python benchmarks/dist_throughput.py --quick    # 40 steps per worker

``--wire`` measures instead what issue 10's safe transport costs, side by side in one run:
the same jobs with the wire of before (pickle, no frame MACs:
``src/relaxsgd/distributed/wire.py`` of commit ``LEGACY_COMMIT``, put back by a hook of
``distkit``), with the current one (tagged encoding, authenticated peers, HMAC-SHA256 per
frame) and with TLS (a throw-away CA made with ``openssl``), interleaved and repeated
(``--reps``), the median samples/s of each:

    python benchmarks/dist_throughput.py --wire --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

# the dist runtime's test harness lives in tests/distkit (not shipped with the package)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # (sync_trace)

_HERE = os.path.dirname(os.path.abspath(__file__))
# the project's MNIST files: beside the main checkout, or beside a worktree's parent
MNIST_DIR = os.environ.get("RELAXSGD_MNIST_DIR") or next(
    (d for d in (os.path.join(_HERE, *[".."] * k, "shared", "data", "mnist") for k in (2, 3))
     if os.path.isdir(d)), os.path.join(_HERE, "..", "..", "shared", "data", "mnist"))
N = 4
# (label, algorithm, options); Pipe-SGD: all-reduce SGD's bytes, overlapped (stall %
# drops); 'swarm fp32': SwarmSGD unquantized, what its lattice codec costs on a link
# where bytes are nearly free
ALGOS = [("allreduce", "allreduce", {}), ("localsgd", "localsgd", {"p": 4}),
         ("swarm", "swarm", {}), ("swarm fp32", "swarm", {"quantizer": "none"}),
         ("olco3", "olco3", {}), ("pipesgd", "pipesgd", {})]


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


# -- calibration through the runtime's own path -----------------------------------------
def runtime_profile(cfg: dict[str, Any], folder: str) -> str:
    """``relaxsgd calibrate`` on N processes with the run's task: a profile whose network
    section is what the dist runtime's executor pays (latency, per-message overhead,
    bandwidth, the executor's all-reduce and all-gather lines)."""
    import yaml

    from relaxsgd.distributed.launch import LocalJob

    conf, path = os.path.join(folder, "calibrate.yaml"), os.path.join(folder, "profile.yaml")
    with open(conf, "w", encoding="utf-8") as f:
        yaml.safe_dump({k: cfg[k] for k in ("task", "task_options", "data_dir", "train")}, f)
    job = LocalJob([sys.executable, "-m", "relaxsgd.cli", "calibrate", "--config", conf,
                    "--out", path], N, log_dir=os.path.join(folder, "calibrate-logs"))
    codes = job.wait(timeout=900)
    if any(codes):
        raise SystemExit(f"calibration failed: exit statuses {codes}:\n{job.output(0)}")
    return path


# -- the runs --------------------------------------------------------------------------
def predicted(cfg: dict[str, Any], step_time: float, profile: str,
              sigma: float | None = None, factors: list[float] | None = None) -> float:
    """Samples/s the simulator predicts: the step time given, the codec time per element
    of ``profile``, and a spread of the step time within a synchronous round (``sigma``:
    that one, compute.heterogeneity jitter; None: calibrate's, calibrated; 0: none, every
    step the mean), or each worker's own speed (``factors``, its step over the mean:
    compute.heterogeneity fixed)."""
    from relaxsgd.config import from_dict
    from relaxsgd.run import prepare, simulate

    het = ({"heterogeneity": "fixed", "speed_factors": factors} if factors else
           {"heterogeneity": "calibrated"} if sigma is None else
           {"heterogeneity": "jitter", "sigma": sigma} if sigma > 0 else {})
    d = {**cfg, "workers": N, "network": profile,
         "compute": {"step_time_s": step_time, "profile": profile, "codec": "on", **het}}
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
    global N
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="40 steps per worker, not 200")
    ap.add_argument("--wire", action="store_true",
                    help="compare the wire format of before, the current one, and TLS")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of --wire")
    ap.add_argument("--before", action="store_true",
                    help="also all-reduce SGD and SwarmSGD as before the transport's "
                    "idle-connection fast path (every message via a sender thread)")
    ap.add_argument("--workers", type=int, default=4,
                    help="processes (default 4; on a 2-core machine, 2 gives each its "
                    "own core)")
    ap.add_argument("--legacy-wire", metavar="FILE",
                    help=f"the old wire.py (default: git show {LEGACY_COMMIT}:...)")
    a = ap.parse_args()
    N = a.workers
    if a.wire:
        wire_comparison(40 if a.quick else 200, a.reps, a.legacy_wire)
        return
    import torch

    torch.set_num_threads(1)
    throughput(40 if a.quick else 200, every_prediction=not a.quick, before=a.before)


# the workers meet in rounds (one blocking wait a round: split by the trace); OLCO3's
# rounds meet at the server (its wait is for the reply of s rounds before)
SYNC = ("allreduce", "localsgd", "pipesgd", "olco3")
BEFORE = ("allreduce", "swarm")  # also run as before: every message via a sender thread


def throughput(steps: int, every_prediction: bool = True, before: bool = False) -> None:
    """Samples/s of each algorithm, measured and predicted (see the module doc); without
    ``every_prediction`` (--quick) only the prediction with the run's own step time."""
    from distkit import run_jobs
    from relaxsgd.algorithms import ALGORITHMS
    from relaxsgd.config import from_dict
    from relaxsgd.run import measure_step_time, prepare
    from relaxsgd.sim.compute import expected_max_lognormal
    from sync_trace import (
        print_rounds,
        run_cpu,
        run_lattice_costs,
        run_spread,
        with_lattice_costs,
    )

    runs_of = [(label_of(lb, b), n, o, b) for lb, n, o in ALGOS if n in ALGORITHMS
               for b in ((True, False) if before and lb in BEFORE else (False,))]
    cfgs = [config(n, o, steps) for _, n, o, _ in runs_of]
    t0, load0 = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        profile = runtime_profile(cfgs[0], d)
        with open(profile, encoding="utf-8") as f:
            prof = __import__("yaml").safe_load(f)
        net, comp = prof["network"], prof["compute"]
        alone = measure_step_time(prepare(from_dict({**cfgs[0], "workers": N})))
        queued = ",".join(str(k) for k, r in enumerate(runs_of) if r[3])
        trace = os.path.join(d, "trace")
        runs = run_jobs(cfgs, N, os.path.join(d, "runs"), timeout=1800,
                        env={"RELAXSGD_SAVE_MODELS": "0", "RELAXSGD_BENCH_QUEUED_SENDS": queued,
                             "RELAXSGD_BENCH_TRACE": trace})
        if any(runs[0].codes):
            raise SystemExit("the distributed runs failed:\n" + "\n".join(runs[0].logs))
        name, topts, _ = task()
        print(f"{N} processes, gloo on loopback, {name} {topts['model']}, batch 32, "
              f"{steps} steps per worker; load average {load0[0]:.1f} at the start, "
              f"{os.getloadavg()[0]:.1f} at the end")
        print(f"network as the runtime pays it (relaxsgd calibrate, {N} processes): latency "
              f"{net['latency_s'] * 1e6:.0f} us, overhead {net['overhead_s'] * 1e6:.0f} us a "
              f"message, bandwidth {net['bandwidth_Bps'] / 1e9:.2f} GB/s; step time alone "
              f"{alone * 1e3:.1f} ms; codec (8-bit lattice) {comp['encode_s'] * 1e9:.1f} ns "
              f"an element encoded, {comp['decode_s'] * 1e9:.1f} decoded; step in "
              f"synchronous rounds {comp['step_time_s'] * 1e3:.1f} ms, spread sigma "
              f"{comp['step_sigma']:.3f} (slowest/mean {comp['step_max_over_mean']:.2f}; "
              f"E[max of {N}]/mean {expected_max_lognormal(N, comp['step_sigma']):.2f})")
        cores = os.cpu_count() or 1
        shared = alone * max(1.0, N / cores)
        print(f"CPU bound of this machine ({cores} cores, compute only): "
              f"{min(cores, N) * 32 / alone:.0f} samples/s")
        head = (f"{'algorithm':<16} {'step ms':>7} {'measured':>8} {'pred.alone':>10} "
                f"{'ratio':>5} {'pred.shared':>11} {'ratio':>5} {'pred.run':>8} {'ratio':>5} "
                f"{'no jitter':>9} {'stall %':>7} {'MB/worker':>9} {'CPU ms/step':>11} "
                f"{'cores':>5}")
        print(head)
        print("-" * len(head))
        got: dict[str, tuple[float, float]] = {}
        coded: dict[str, tuple[float, float]] = {}
        for k, ((label, algo, _, was), cfg, r) in enumerate(zip(runs_of, cfgs, runs,
                                                                strict=True)):
            f = r.result["final"]
            wall = f["virtual_time_s"]
            measured = f["samples_total"] / wall
            st = r.result["dist"]["step_time_s_per_worker"]
            in_run = sum(st.values()) / len(st)
            # a synchronous run's own spread and work between collectives (its trace);
            # the others: calibrate's spread, the timed step
            spread = run_spread(trace, k, N) if algo in SYNC else None
            own, sigma = (in_run * spread[1], spread[0]) if spread else (in_run, None)
            # the others (SwarmSGD: asynchronous, no round waits for the slowest): each
            # worker's own step time in the run (a worker that hosts more, or gets less of
            # the cores, finishes later, and the run with it)
            factors = None if spread else [
                st[r] / in_run for r in sorted(st, key=int)] if in_run > 0 else None
            # the lattice's cost per element as this run paid it (SwarmSGD: its handlers
            # code on a thread that shares the cores with the steps of 4 processes)
            paid = run_lattice_costs(trace, k, N)
            prof_k = (with_lattice_costs(profile, paid, os.path.join(d, f"profile{k}.yaml"))
                      if paid else profile)
            if paid:
                coded[label] = paid
            # (the "before" rows and --quick: only the prediction with the run's own step
            # time; each prediction is a whole simulation, most of the benchmark's time)
            preds = [None, None, predicted(cfg, own, prof_k, sigma, factors)] \
                if was or not every_prediction else \
                [predicted(cfg, s, profile, sigma) for s in (alone, shared)] + \
                [predicted(cfg, own, prof_k, sigma, factors)]
            got[label] = (measured, measured / preds[2])
            cells = "".join(f" {p:>{w}.0f} {measured / p:>5.2f}" if p else
                            f" {'-':>{w}} {'-':>5}"
                            for p, w in zip(preds, (10, 11, 8), strict=True))
            flat = measured / predicted(cfg, in_run, prof_k, 0.0)
            cpu = run_cpu(trace, k, N)
            # CPU per local step of workers 1.. (rank 0 also evaluates and writes the
            # outputs), and the cores all N processes kept busy over the run
            use = (f" {1e3 * statistics.fmean(cpu[0][1:] or cpu[0]) / steps:>11.1f} "
                   f"{cpu[1]:>5.2f}") if cpu else f" {'-':>11} {'-':>5}"
            print(f"{label:<16} {in_run * 1e3:>7.1f} {measured:>8.0f}{cells} {flat:>9.2f} "
                  f"{100 * f['stall_time_s_mean'] / wall:>7.1f} "
                  f"{f['bytes_sent_per_worker_max'] / 1e6:>9.2f}{use}")
        print()  # (the traces are in the temporary folder)
        for label, (e, dc) in coded.items():
            print(f"lattice as {label} paid it (its trace): {e * 1e9:.1f} ns an element "
                  f"encoded, {dc * 1e9:.1f} decoded (calibrate: {comp['encode_s'] * 1e9:.1f}, "
                  f"{comp['decode_s'] * 1e9:.1f}); 'pred.run' charges these")
        print_rounds(trace, [a if a in SYNC and not b else None for _, a, _, b in runs_of], N)
        a, b = net["collectives"]["allreduce"][str(N)]
        nbytes = 4 * param_count(cfgs[0])
        print(f"the calibrated all-reduce of the model ({nbytes / 1e6:.2f} MB), what the "
              f"simulator charges for 'collect.': {(a + b * nbytes) * 1e3:.1f} ms")
    print("samples/s of all workers together; 'step ms': compute time per local step "
          "measured in the run; predictions by the simulator on the calibrated network "
          f"with the step time measured alone ({alone * 1e3:.1f} ms), alone x {N}/{cores} "
          f"processes per core ({shared * 1e3:.1f} ms), or in the run ('pred.run'), each "
          "with a spread of the step time within a round (compute.heterogeneity jitter): "
          "for all-reduce SGD, Local SGD, Pipe-SGD and OLCO3 the run's own (its trace: the "
          "'sigma' below) and the run's step scaled to all the work between its "
          "collectives ('comp mean'/'timed' below), for the others each worker's own "
          "step in the run (and calibrate's spread in the other columns); ratio = "
          "measured / predicted; 'no jitter': the ratio to "
          "the prediction from the run's step without any spread (every worker's step "
          "the mean: what the simulator charged before); '(before)' (--before): every "
          "message handed to a sender thread; 'swarm fp32': SwarmSGD with "
          "quantizer none; 'CPU ms/step': each process's CPU time (every thread) over "
          "its local steps, the mean of workers 1.. (rank 0 also evaluates and writes "
          f"the outputs); 'cores': the cores all {N} processes kept busy over the run "
          f"(at most {cores}: a run near it is bound by the CPU, not the network)")
    summary(got)
    print(f"({time.perf_counter() - t0:.0f} s)")


def label_of(algo: str, before: bool) -> str:
    return f"{algo} (before)" if before else algo


def summary(got: dict[str, tuple[float, float]]) -> None:
    """The goals: SwarmSGD's samples/s >= all-reduce SGD's; every measured/predicted
    (step time of the run) >= 0.8."""
    if "swarm" in got and "allreduce" in got:
        ar = got["allreduce"][0]
        line = f"SwarmSGD / all-reduce SGD samples/s: {got['swarm'][0] / ar:.2f} (goal >= 1)"
        if "swarm fp32" in got:
            line += f"; unquantized SwarmSGD: {got['swarm fp32'][0] / ar:.2f}"
        if "swarm (before)" in got:
            line += (f"; before (queued sends): "
                     f"{got['swarm (before)'][0] / got['allreduce (before)'][0]:.2f}")
        print(line)
    ratios = {a: r for a, (_, r) in got.items() if not a.endswith("(before)")}
    worst = min(ratios, key=ratios.__getitem__)
    print(f"measured/predicted (step time of the run): lowest {ratios[worst]:.2f} ({worst}; "
          "goal >= 0.8): " + ", ".join(f"{a} {r:.2f}" for a, r in ratios.items()))


if __name__ == "__main__":
    main()
