"""One simulated run as an object: build it, run it, evaluate it, finish it.

:class:`Simulation` holds what a run of the simulator is made of (the parameter bank and
its workers on the run's device, the network and compute models, the event engine, the
recorder of ``metrics.csv`` and the checkpoint saver) and its progress (local steps done,
the next evaluation point, the wall time spent evaluating). Its steps are methods:
``__init__`` builds (and restores a checkpoint), :meth:`run` drives the engine to the end,
:meth:`evaluate` records one row, :meth:`finish` writes ``result.json``, the plots and the
models. :func:`relaxsgd.run.simulate` is ``Simulation(...).run()``.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .bank import Bank
from .checkpoint import RESTORE_ERRORS
from .config import dump_yaml
from .devices import resolve_device
from .errors import ConfigError, Diverged, StoppedAtCheckpoint
from .membership import NotElastic, QuorumLost
from .metrics import CommStats, Recorder, aggregate_worker_metrics
from .outputs import models_payload, save_models, shield_interrupts, write_json
from .progress import Progress
from .results import (
    INTERRUPTED,
    INTERRUPTED_FINAL,
    DivergedAfterWrite,
    make_result,
    write_result,
)
from .sim.churn_setup import check_churn, start_churn
from .sim.compute import ComputeModel, codec_costs, codec_table, resolve_step_time
from .sim.engine import Engine
from .sim.network import Network, make_network_config, network_model_info
from .sim.saving import SimCheckpoints
from .worker import LocalWorker

if TYPE_CHECKING:
    from .run import Prepared


@dataclass
class SimOutcome:
    """A finished simulated run, with its internals for tests and benchmarks."""

    result: dict[str, Any]
    bank: Bank
    workers: list[LocalWorker]
    engine: Engine
    rows: list[dict[str, Any]]
    engine_wall_s: float = 0.0  # wall time inside the event loop, evaluations excluded


def measure_step_time(prep: Prepared, repeats: int = 7,
                      device: torch.device | None = None) -> float:
    """Median wall time of one local step of worker 0's model alone on this machine."""
    bank = Bank(prep.spec, prep.cfg.train, [0], prep.shards[:1], prep.cfg.seed, 10**9,
                batching="loop", device=device or torch.device("cpu"))
    times = []
    for i in range(repeats + 2):
        t0 = time.perf_counter()
        bank.local_steps([0], 1)
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Simulation:
    """A simulated run of ``prep``; ``out``: its folder (None: nothing written);
    ``resume``: a checkpoint (:func:`relaxsgd.checkpoint.load`) to continue from."""

    def __init__(self, prep: Prepared, out: str | None = None, progress: bool = False,
                 resume: dict[str, Any] | None = None,
                 on_eval: Callable[[dict[str, Any]], None] | None = None) -> None:
        cfg, n = prep.cfg, prep.cfg.workers
        self.prep, self.out, self.resume, self.n = prep, out, resume, n
        ids = cfg.elastic.ids(n)  # worker ids: rows of the bank (elastic.max_workers)
        # elastic: churn, or ids beyond the workers (absent until they join)
        churn = cfg.elastic.churn.active or ids > n
        if churn:
            check_churn(prep)
        self.on_eval = on_eval  # e.g. relaxsgd tune's pruning; see run.simulate
        self.failure: Exception | None = None  # a membership failure (raised after writing)
        # A finished run's bank (and its data set) is freed only by the cyclic garbage
        # collector (vmap closures, generator frames and engine callbacks form cycles),
        # whose thresholds count Python objects, not tensor memory: without this, a
        # process that runs many simulations (compare, benchmarks, tests) grows by about
        # the data set's size per run.
        gc.collect()
        self.wall0 = time.perf_counter()
        if cfg.threads:
            # One thread by default: on a small shared CPU, OpenMP's spinning threads make
            # a step 100x slower whenever another process is busy (measured: 0.4 ms ->
            # 140 ms for the MNIST-1D MLP), which would corrupt the measured step time.
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.step_time, compute_info = resolve_step_time(
            cfg.compute, prep.spec, cfg.train.batch_size,
            lambda: measure_step_time(prep, device=self.device))
        if out and compute_info["kind"] == "measured":
            # config.yaml gets the measured step time, so that it reruns this very run
            prep.resolved["compute"]["step_time_s"] = self.step_time
            dump_yaml(prep.resolved, os.path.join(out, "config.yaml"))
        self.bank = Bank(prep.spec, cfg.train, list(range(ids)), prep.shards, cfg.seed,
                         prep.total_steps, batching=cfg.batching, device=self.device)
        prep.info.dim = self.bank.d
        self.done = 0  # local steps done, summed over workers
        self.next_eval = 0
        self.eval_wall = 0.0
        self.workers = [LocalWorker(self.bank, r, n, cfg.seed, prep.total_steps,
                                    on_step=self._count_steps) for r in range(ids)]
        for w in self.workers:
            prep.algo.init_worker(w)
        net_cfg = make_network_config(cfg.network, **cfg.network_options)
        codec, per_codec = codec_costs(cfg.compute), codec_table(cfg.compute)
        compute_info["codec"] = ({"encode_s": codec[0], "decode_s": codec[1]} if codec
                                 else "off")
        if codec and per_codec:  # each codec's own costs (a calibrated profile's codecs)
            compute_info["codec"]["codecs"] = {k: {"encode_s": e, "decode_s": d}
                                               for k, (e, d) in per_codec.items()}
        self.models_info = {"compute_model": compute_info,
                            "network_model": network_model_info(net_cfg, n)}
        self.shared_key = getattr(prep.algo, "shared_model_state", None)  # OLCO3's "xg"
        self.csv_path = os.path.join(out, "metrics.csv") if out else None
        # a resumed run opens metrics.csv only once its checkpoint is restored: a damaged
        # one must leave the old file as it is
        self.rec = Recorder(prep.spec, self.csv_path if resume is None else None, n,
                            self.bank.d, prep.spec.data.x_train.shape[0],
                            list(prep.algo.metric_keys), cfg.eval_samples,
                            shared_model=self.shared_key is not None,
                            worker_samples=cfg.eval_worker_samples, device=self.device)
        self.every = max(1, math.ceil(prep.total_steps / cfg.evals)) * n
        self.bar = Progress(prep.total_steps * n, f"{cfg.algo} on {cfg.task}", progress)
        self.saver = SimCheckpoints(cfg.checkpoint_every,
                                    out if prep.algo.resumable and not churn else None,
                                    prep.resolved,
                                    self._run_state)
        self.engine = Engine(prep.algo, self.workers, self.bank,
                             Network(net_cfg, ids, cfg.seed),
                             ComputeModel(cfg.compute, ids, cfg.seed, self.step_time, codec,
                                          per_codec),
                             between_instants=self._between)
        if churn:
            start_churn(self.engine, cfg)
        self.saver.attach(self.engine, resume is not None)
        if resume is not None:
            self._restore(resume)

    # -- building ------------------------------------------------------------------
    def _count_steps(self, k: int) -> None:
        self.done += k

    def _run_state(self) -> dict[str, Any]:
        """The runner's part of a checkpoint."""
        return {"done": self.done, "next_eval": self.next_eval, "rows": self.rec.rows,
                "wall_time": time.perf_counter() - self.wall0}

    def _restore(self, resume: dict[str, Any]) -> None:
        try:
            self.saver.restore(resume, self.engine)
            r = resume["run"]
            self.done, self.next_eval = int(r["done"]), int(r["next_eval"])
            self.rec.restore(r["rows"])
            self.wall0 -= float(r["wall_time"])
        except RESTORE_ERRORS as e:
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(f"the checkpoint in {self.out!r} cannot be restored "
                              f"(damaged?): {why}") from None
        if self.csv_path is not None:
            self.rec.open(self.csv_path)
        self.bar.update(self.done, "resumed")

    # -- evaluating ----------------------------------------------------------------
    def evaluate(self, now: float) -> dict[str, Any]:
        """Record one row of ``metrics.csv`` at virtual time ``now`` (timed as evaluation)."""
        t0 = time.perf_counter()
        try:
            return self._record(now)
        finally:
            self.eval_wall += time.perf_counter() - t0

    def _record(self, now: float) -> dict[str, Any]:
        engine, bank, n = self.engine, self.bank, self.n
        per = [p.bytes_sent for p in engine.procs] or [0]
        comm = CommStats(bytes_total=sum(per) + engine.server_bytes,
                         bytes_per_worker_max=max(per),
                         messages_total=sum(p.messages for p in engine.procs)
                         + engine.server_messages,
                         stall_mean=sum(p.stall for p in engine.procs) / max(n, 1))
        key = self.shared_key
        # under churn the models of the live workers (a departed one's is out of reach);
        # "worker 0" is then the lowest live id
        live = [p.w.rank for p in engine.procs if not p.gone]
        X, first, rows = bank.X, 0, None
        if engine.members is not None and live:
            X, first, rows = bank.X[live], live[0], live
        return self.rec.record(
            step=self.done / n, samples=sum(bank.samples), virtual_time=now,
            wall_time=time.perf_counter() - self.wall0, X=X,
            mean_buffers=bank.mean_buffers(rows), w0_buffers=bank.buffers_of(first), comm=comm,
            train_loss=bank.take_train_loss(), extra=aggregate_worker_metrics(self.workers),
            buffers_of=(bank.buffers_of if X is bank.X else lambda k: bank.buffers_of(live[k])),
            shared=self.workers[first].state.get(key) if key else None,
            live_workers=len(live))

    def _between(self, now: float) -> None:
        """The engine's hook between instants: evaluate when due, checkpoint when due."""
        if self.done >= self.next_eval:
            row = self.evaluate(now)
            self.next_eval = (self.done // self.every + 1) * self.every
            if self.on_eval is not None:
                self.on_eval(row)
            self.bar.update(self.done, f"acc {row['accuracy_mean_model']:.4f} "
                            f"eval {self.eval_share():.0%}")
            self._running_result(row)
        self.saver.poll()

    def eval_share(self) -> float:
        """The share of the wall time so far spent evaluating."""
        wall = time.perf_counter() - self.wall0
        return self.eval_wall / wall if wall > 0 else 0.0

    def _result(self, status: str, message: str, steps: float) -> dict[str, Any]:
        res = make_result(self.prep, self.rec, status, message, self.step_time,
                          self.bank.batching, aggregate_worker_metrics(self.workers), steps)
        res["device"] = str(self.device)
        res["evaluation"] = self.rec.eval_info()  # on what the models were evaluated
        # what evaluating cost: wall clock, so beside wall_time_s
        res["final"]["eval_wall_time_s"] = round(self.eval_wall, 3)
        res["final"]["eval_wall_share"] = round(self.eval_share(), 4)
        res.update(self.models_info)
        membership = self.engine.churn_record()
        if membership is not None:
            res["membership"] = membership
        return res

    def _running_result(self, row: dict[str, Any]) -> None:
        """result.json after every evaluation (status "running"): a run killed at any
        moment leaves a valid one with the figures measured so far."""
        if self.out:
            write_json(os.path.join(self.out, "result.json"),
                       self._result("running", "", row["step"]))

    # -- running -------------------------------------------------------------------
    def run(self) -> SimOutcome:
        """Run to the end and write the outputs; a diverged or interrupted run raises
        after writing."""
        engine = self.engine
        status, message, vtime, t_run = "completed", "", 0.0, 0.0
        stopped_at: StoppedAtCheckpoint | None = None
        eval_before = self.eval_wall
        try:
            t_run = time.perf_counter()
            with self.saver.signals.installed(self.saver.path is not None):
                vtime = engine.run(resume=self.resume is not None)
            t_run = time.perf_counter() - t_run
        except Diverged as e:
            status, message, vtime = "diverged", str(e), engine.now
        except (QuorumLost, NotElastic) as e:  # churn: written, then raised (exit 5)
            status, message, vtime, self.failure = "failed", str(e), engine.now, e
        except StoppedAtCheckpoint as e:
            how = "Ctrl-C" if e.signum == signal.SIGINT else "SIGTERM"
            status, vtime, stopped_at = "interrupted", engine.now, e
            message = INTERRUPTED.replace("Ctrl-C", how) + "; " + e.note
        except KeyboardInterrupt:
            status, message, vtime = "interrupted", INTERRUPTED, engine.now
        engine_wall = max(t_run - (self.eval_wall - eval_before), 0.0)
        last = self.rec.rows[-1] if self.rec.rows else None
        if status != "interrupted" and (last is None
                                        or last["step"] != round(self.done / self.n, 3)
                                        or last["virtual_time_s"] != vtime):
            try:  # the final state, with the communication after the last step
                self.evaluate(vtime)
            except KeyboardInterrupt:  # a long final evaluation must not hold up Ctrl-C
                status, message = "interrupted", INTERRUPTED_FINAL
        return self.finish(status, message, vtime, stopped_at, engine_wall)

    def finish(self, status: str, message: str, vtime: float,
               stopped_at: StoppedAtCheckpoint | None = None,
               engine_wall: float = 0.0) -> SimOutcome:
        """Write result.json, the plots and the models; raise for a run that did not
        complete (after writing)."""
        rec, bank, n = self.rec, self.bank, self.n
        if status == "completed":
            self.bar.finish(f"acc {rec.rows[-1]['accuracy_mean_model']:.4f} "
                            f"eval {self.eval_share():.0%}")
        self.bar.close()
        stopped = status == "interrupted" and rec.rows  # figures of the last evaluation
        result = self._result(status, message,
                              rec.rows[-1]["step"] if stopped else self.done / n)
        if not stopped:
            result["final"]["virtual_time_s"] = vtime
        with shield_interrupts() as held:  # a second Ctrl-C must not leave half the outputs
            rec.close()
            if self.out:
                write_result(self.out, result, rec)
                save_models(os.path.join(self.out, "models.pt"), models_payload(
                    bank.template, bank.X, [bank.buffers_of(i) for i in range(n)],
                    bank.mean_buffers(), list(range(n))))
        if status == "diverged":
            raise DivergedAfterWrite(message, self.out)
        if status == "failed" and self.failure is not None:
            raise self.failure
        if stopped_at is not None:
            raise stopped_at
        if status == "interrupted" or held:
            raise KeyboardInterrupt
        return SimOutcome(result, bank, self.workers, self.engine, rec.rows,
                          engine_wall_s=engine_wall)
