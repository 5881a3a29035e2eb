"""One run, end to end: resolve the config, build the task and algorithm, run it, write it.

:func:`prepare` turns a :class:`RunConfig` into the pieces both runtimes need;
:func:`run` drives the simulator (``runtime: sim``) or hands over to the distributed
runtime, and writes the output folder: ``config.yaml``, ``metrics.csv`` (written row by
row, so nothing measured is lost on Ctrl-C or divergence), ``result.json`` and plots.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from .algorithms import ALGORITHMS
from .algorithms.base import Algorithm, RunInfo
from .bank import Bank
from .config import RunConfig, _typed, dump_yaml
from .errors import ConfigError, Diverged, RelaxError, StoppedAtCheckpoint
from .metrics import LM_COLUMNS, CommStats, Recorder, aggregate_worker_metrics, write_sample
from .outputs import models_payload, save_models, shield_interrupts, write_json
from .progress import Progress
from .sim.compute import ComputeModel, load_profile, resolve_step_time
from .sim.engine import Engine
from .sim.network import Network, make_network_config, network_model_info
from .sim.saving import SimCheckpoints
from .tasks import TASKS
from .tasks.base import TaskSpec
from .worker import LocalWorker


@dataclass
class Prepared:
    cfg: RunConfig
    spec: TaskSpec
    shards: list[torch.Tensor]
    total_steps: int
    algo: Algorithm
    info: RunInfo
    resolved: dict[str, Any]


def algorithm_options(name: str) -> list[str]:
    return [f.name for f in fields(ALGORITHMS.get(name).Config)]


def task_options(name: str) -> list[str]:
    return list(getattr(TASKS.module(name), "OPTIONS", {}))


def build_topology(cfg: RunConfig) -> Any:
    from .topology import make_topology

    return make_topology(cfg.topology, cfg.workers, seed=cfg.seed, **cfg.topology_options)


def prepare(cfg: RunConfig) -> Prepared:
    """Resolve everything a run needs; every bad name or value is a ConfigError here."""
    algo_cls = ALGORITHMS.get(cfg.algo)
    algo_cfg = _typed(algo_cls.Config, cfg.algo_options, f"algorithm {cfg.algo!r}")
    make_network_config(cfg.network, **cfg.network_options)  # validate early
    load_profile(cfg.compute.profile)  # a bad --compute is an error even with a step time
    spec: TaskSpec = TASKS.get(cfg.task)(dict(cfg.task_options), cfg.data_dir, cfg.seed)
    from .tasks.splits import split_indices

    n_train = spec.data.x_train.shape[0]
    if cfg.workers > n_train:
        raise ConfigError(f"{cfg.workers} workers but only {n_train} training samples; "
                          "use fewer workers")
    if cfg.split == "play" and spec.groups is None:
        raise ConfigError(f"split 'play' deals whole works and task {cfg.task!r} has none; "
                          "use it with task shakespeare, or split iid, shards or dirichlet")
    labels = spec.groups if spec.groups is not None else spec.data.y_train
    shards = split_indices(labels, cfg.workers, cfg.split, cfg.seed, **cfg.split_options)
    share = n_train // cfg.workers  # the mean shard (non-iid splits vary around it)
    if cfg.train.batch_size > share:  # each batch would wrap around the shard
        raise ConfigError(f"batch size {cfg.train.batch_size} is larger than a worker's share "
                          f"of the training set ({n_train} samples over {cfg.workers} workers"
                          f" = {share}); use --batch-size {share} or less, or fewer workers")
    if cfg.steps is not None:
        total = cfg.steps
    else:
        epochs = cfg.epochs if cfg.epochs is not None else 1.0
        total = max(1, math.ceil(epochs * n_train / (cfg.workers * cfg.train.batch_size)))
    # Only algorithms that talk over a graph build one: all-reduce algorithms ignore
    # --topology, as documented, rather than reject a graph they would not use.
    topo = build_topology(cfg) if algo_cls.needs_topology else None
    info = RunInfo(n=cfg.workers, seed=cfg.seed, topology=topo, dim=0)
    algo = algo_cls(algo_cfg, info)
    resolved = cfg.to_dict()
    resolved["algo_options"] = dataclasses.asdict(algo_cfg)
    resolved["steps_per_worker"] = total  # for the reader; ignored when read back
    resolved.pop("out", None)  # where the run was written is not part of the run
    return Prepared(cfg, spec, shards, total, algo, info, resolved)


def measure_step_time(prep: Prepared, repeats: int = 7) -> float:
    """Median wall time of one local step of worker 0's model alone on this machine."""
    bank = Bank(prep.spec, prep.cfg.train, [0], prep.shards[:1], prep.cfg.seed, 10**9,
                batching="loop")
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        bank.local_steps([0], 1)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def default_out_dir(cfg: RunConfig) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}-{cfg.algo}-{cfg.task}-n{cfg.workers}")
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}-{k}"
    return path


def run(cfg: RunConfig, progress: bool = True, write: bool = True,
        resume: bool = False) -> dict[str, Any]:
    """Run one configuration; returns the result dict (also written as result.json).

    ``resume``: continue the run in ``cfg.out`` from its checkpoint (``relaxsgd resume``)."""
    if cfg.runtime == "dist":
        from .distributed.runtime import run_dist  # type: ignore[import-not-found]

        return run_dist(cfg, progress=progress, write=write, resume=resume)
    prep = prepare(cfg)
    out = None
    ck = None
    if resume:
        from . import checkpoint

        out = cfg.out
        ck = checkpoint.load(os.path.join(out, checkpoint.FILE), "sim", prep.resolved)
    elif write:
        out = cfg.out or default_out_dir(cfg)
        os.makedirs(out, exist_ok=True)
        dump_yaml(prep.resolved, os.path.join(out, "config.yaml"))
    try:
        return simulate(prep, out, progress, resume=ck).result
    except KeyboardInterrupt:
        if out and not os.path.exists(os.path.join(out, "result.json")):
            with shield_interrupts():  # Ctrl-C before the first step: say so, in JSON
                write_json(os.path.join(out, "result.json"), {
                    **result_header(cfg), "status": "interrupted", "final": None,
                    "message": "interrupted during start-up, before the first local step"})
        raise


@dataclass
class SimOutcome:
    """A finished simulated run, with its internals for tests and benchmarks."""

    result: dict[str, Any]
    bank: Bank
    workers: list[LocalWorker]
    engine: Engine
    rows: list[dict[str, Any]]
    engine_wall_s: float = 0.0  # wall time inside the event loop, evaluations excluded


def run_sim(prep: Prepared, out: str | None, progress: bool = True) -> dict[str, Any]:
    return simulate(prep, out, progress).result


def simulate(prep: Prepared, out: str | None = None, progress: bool = False,
             resume: dict[str, Any] | None = None,
             on_eval: Callable[[dict[str, Any]], None] | None = None) -> SimOutcome:
    """Run ``prep`` in the simulator; a diverged or interrupted run raises after writing.

    ``resume``: a checkpoint (:func:`relaxsgd.checkpoint.load`) to continue from.
    ``on_eval``: called with every evaluation's row as it is recorded (``relaxsgd tune``
    prunes and stops trials from it; an exception it raises ends the run unwritten)."""
    cfg, n, total = prep.cfg, prep.cfg.workers, prep.total_steps
    # A finished run's bank (and its data set) is freed only by the cyclic garbage collector
    # (vmap closures, generator frames and engine callbacks form cycles), whose thresholds
    # count Python objects, not tensor memory: without this, a process that runs many
    # simulations (compare, benchmarks, tests) grows by about the data set's size per run.
    gc.collect()
    wall0 = time.perf_counter()
    if cfg.threads:
        # One thread by default: on a small shared CPU, OpenMP's spinning threads make a
        # step 100x slower whenever another process is busy (measured: 0.4 ms -> 140 ms
        # for the MNIST-1D MLP), which would corrupt the measured step time.
        torch.set_num_threads(cfg.threads)
    step_time, compute_info = resolve_step_time(
        cfg.compute, prep.spec, cfg.train.batch_size, lambda: measure_step_time(prep))
    if out and compute_info["kind"] == "measured":
        # config.yaml gets the measured step time, so that it reruns this very run
        prep.resolved["compute"]["step_time_s"] = step_time
        dump_yaml(prep.resolved, os.path.join(out, "config.yaml"))
    bank = Bank(prep.spec, cfg.train, list(range(n)), prep.shards, cfg.seed, total,
                batching=cfg.batching)
    prep.info.dim = bank.d
    done = [0]
    workers = [LocalWorker(bank, r, n, cfg.seed, total,
                           on_step=lambda k: done.__setitem__(0, done[0] + k))
               for r in range(n)]
    for w in workers:
        prep.algo.init_worker(w)
    net_cfg = make_network_config(cfg.network, **cfg.network_options)
    net = Network(net_cfg, n, cfg.seed)
    comp = ComputeModel(cfg.compute, n, cfg.seed, step_time)
    models_info = {"compute_model": compute_info,
                   "network_model": network_model_info(net_cfg, n)}
    shared_key = getattr(prep.algo, "shared_model_state", None)  # e.g. OLCO3's "xg"
    csv_path = os.path.join(out, "metrics.csv") if out else None
    # a resumed run opens metrics.csv only once its checkpoint is restored: a damaged one
    # must leave the old file as it is
    rec = Recorder(prep.spec, csv_path if resume is None else None, n, bank.d,
                   prep.spec.data.x_train.shape[0], list(prep.algo.metric_keys),
                   cfg.eval_samples, shared_model=shared_key is not None)
    every = max(1, math.ceil(total / cfg.evals)) * n
    next_eval = [0]
    bar = Progress(total * n, f"{cfg.algo} on {cfg.task}", progress)
    engine: Engine | None = None
    saver = SimCheckpoints(cfg.checkpoint_every, out if prep.algo.resumable else None,
                           prep.resolved, lambda: {
                               "done": done[0], "next_eval": next_eval[0], "rows": rec.rows,
                               "wall_time": time.perf_counter() - wall0})

    eval_wall = [0.0]

    def snapshot(now: float) -> dict[str, Any]:
        t_eval = time.perf_counter()
        try:
            return _snapshot(now)
        finally:
            eval_wall[0] += time.perf_counter() - t_eval

    def _snapshot(now: float) -> dict[str, Any]:
        procs = engine.procs if engine is not None else []
        per = [p.bytes_sent for p in procs] or [0]
        comm = CommStats(bytes_total=sum(per) + (engine.server_bytes if engine else 0),
                         bytes_per_worker_max=max(per),
                         messages_total=sum(p.messages for p in procs)
                         + (engine.server_messages if engine else 0),
                         stall_mean=sum(p.stall for p in procs) / max(len(procs), 1))
        return rec.record(step=done[0] / n, samples=sum(bank.samples), virtual_time=now,
                          wall_time=time.perf_counter() - wall0, X=bank.X,
                          mean_buffers=bank.mean_buffers(), w0_buffers=bank.buffers_of(0),
                          comm=comm, train_loss=bank.take_train_loss(),
                          extra=aggregate_worker_metrics(workers), buffers_of=bank.buffers_of,
                          shared=workers[0].state.get(shared_key) if shared_key else None)

    def between(now: float) -> None:
        if done[0] >= next_eval[0]:
            row = snapshot(now)
            next_eval[0] = (done[0] // every + 1) * every
            if on_eval is not None:
                on_eval(row)
            bar.update(done[0], f"acc {row['accuracy_mean_model']:.4f}")
            checkpoint_result(row)
        saver.poll()

    def checkpoint_result(row: dict[str, Any]) -> None:
        """result.json after every evaluation (status "running"): a run killed at any
        moment leaves a valid one with the figures measured so far."""
        if out:
            res = make_result(prep, rec, "running", "", step_time, bank.batching,
                              aggregate_worker_metrics(workers), row["step"])
            res.update(models_info)  # the same keys as the final result.json
            write_json(os.path.join(out, "result.json"), res)

    engine = Engine(prep.algo, workers, bank, net, comp, between_instants=between)
    saver.attach(engine, resume is not None)
    if resume is not None:
        try:
            saver.restore(resume, engine)
            r = resume["run"]
            done[0], next_eval[0] = int(r["done"]), int(r["next_eval"])
            rec.restore(r["rows"])
            wall0 -= float(r["wall_time"])
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"the checkpoint in {out!r} cannot be restored (damaged?): "
                              f"{why}") from None
        if csv_path is not None:
            rec.open(csv_path)
        bar.update(done[0], "resumed")
    status, message, vtime, t_run = "completed", "", 0.0, 0.0
    stopped_at: StoppedAtCheckpoint | None = None
    try:
        t_run = time.perf_counter()
        with saver.signals.installed(saver.path is not None):
            vtime = engine.run(resume=resume is not None)
        t_run = time.perf_counter() - t_run
    except Diverged as e:
        status, message, vtime = "diverged", str(e), engine.now
    except StoppedAtCheckpoint as e:
        how = "Ctrl-C" if e.signum == signal.SIGINT else "SIGTERM"
        status, vtime, stopped_at = "interrupted", engine.now, e
        message = INTERRUPTED.replace("Ctrl-C", how) + "; " + e.note
    except KeyboardInterrupt:
        status, message, vtime = "interrupted", INTERRUPTED, engine.now
    last = rec.rows[-1] if rec.rows else None
    if status != "interrupted" and (last is None or last["step"] != round(done[0] / n, 3)
                                    or last["virtual_time_s"] != vtime):
        try:  # the final state, with the communication after the last step
            snapshot(vtime)
        except KeyboardInterrupt:  # a long final evaluation must not hold up Ctrl-C
            status, message = "interrupted", INTERRUPTED_FINAL
    if status == "completed":
        bar.finish(f"acc {rec.rows[-1]['accuracy_mean_model']:.4f}")
    bar.close()
    stopped = status == "interrupted" and rec.rows  # figures of the last evaluation
    result = make_result(prep, rec, status, message, step_time, bank.batching,
                         aggregate_worker_metrics(workers),
                         rec.rows[-1]["step"] if stopped else done[0] / n)
    if not stopped:
        result["final"]["virtual_time_s"] = vtime
    result.update(models_info)
    with shield_interrupts() as held:  # a second Ctrl-C must not leave half the outputs
        rec.close()
        if out:
            write_result(out, result, rec)
            save_models(os.path.join(out, "models.pt"), models_payload(
                bank.template, bank.X, [bank.buffers_of(i) for i in range(n)],
                bank.mean_buffers(), list(range(n))))
    if status == "diverged":
        raise DivergedAfterWrite(message, out)
    if stopped_at is not None:
        raise stopped_at
    if status == "interrupted" or held:
        raise KeyboardInterrupt
    return SimOutcome(result, bank, workers, engine, rec.rows,
                      engine_wall_s=max(t_run - eval_wall[0], 0.0))


INTERRUPTED = "interrupted by the user (Ctrl-C); the final figures are those of the last " \
    "evaluation"
INTERRUPTED_FINAL = "interrupted by the user (Ctrl-C) during the final evaluation; the " \
    "final figures are those of the evaluation before it"


class DivergedAfterWrite(RelaxError):
    """A divergence reported after the outputs were written."""

    exit_code = 3

    def __init__(self, message: str, out: str | None) -> None:
        super().__init__(message + (f" (outputs so far in {out})" if out else ""))


def make_result(prep: Prepared, rec: Recorder, status: str, message: str, step_time: float,
                batching: str, worker_metrics: dict[str, float], steps: float
                ) -> dict[str, Any]:
    cfg = prep.cfg
    last = rec.rows[-1] if rec.rows else {}
    keys = ["accuracy_mean_model", "accuracy_worker0", "loss_mean_model", "loss_worker0",
            "accuracy_workers_mean", "loss_workers_mean", "accuracy_shared_model",
            "loss_shared_model",
            "virtual_time_s", "wall_time_s", "bytes_sent_total", "bytes_sent_per_worker_max",
            "messages_total", "stall_time_s_mean", "consensus_distance",
            "bits_per_param_per_step", "samples", "epoch"]
    final = {k: last.get(k) for k in keys}
    if "accuracy_shared_model" not in last:  # only for an algorithm with a shared model
        del final["accuracy_shared_model"], final["loss_shared_model"]
    final["steps_per_worker"] = steps
    final["samples_total"] = final.pop("samples")
    final["epochs"] = final.pop("epoch")
    final["bytes_per_worker_per_step"] = (
        (final["bytes_sent_total"] or 0) / cfg.workers / steps if steps else 0.0)
    final.update(worker_metrics)
    final.update({k: last[k] for k in LM_COLUMNS if k in last})
    best = max((r["accuracy_mean_model"] for r in rec.rows), default=None)
    return {
        **result_header(cfg), "status": status, "message": message,
        "step_time_s": step_time, "batching": batching,
        "algo_options": prep.resolved["algo_options"], "final": final,
        "best_accuracy_mean_model": best,
        "best_accuracy_workers_mean": max((r["accuracy_workers_mean"] for r in rec.rows),
                                          default=None),
    }


def result_header(cfg: RunConfig) -> dict[str, Any]:
    """What result.json says about the setting (also when the run never started)."""
    return {"algorithm": cfg.algo, "task": cfg.task, "workers": cfg.workers,
            "runtime": cfg.runtime, "seed": cfg.seed, "network": cfg.network,
            "split": cfg.split, "topology": cfg.topology}


def write_result(out: str, result: dict[str, Any], rec: Recorder) -> None:
    """result.json (strict JSON, atomically) and the plots of one run."""
    write_json(os.path.join(out, "result.json"), result)
    try:
        write_sample(out, rec)
    except Exception as e:  # a sample must never lose the measured results
        print(f"relaxsgd: warning: sample.txt not written: {e}", file=sys.stderr)
    try:
        from .report import plot_runs, plot_title

        plot_runs([(result["algorithm"], rec.rows)], out, title=plot_title(result))
    except Exception as e:  # a plot must never lose the measured results
        print(f"relaxsgd: warning: plots not written: {e}", file=sys.stderr)
