"""``relaxsgd run --runtime dist``: one worker per process, under torchrun or relaxsgd-launch.

Each process resolves the same config with :func:`relaxsgd.run.prepare`, keeps only its own
shard of the training data, holds one row of a :class:`~relaxsgd.bank.Bank` (its model,
momentum and data sampler: the same training math and the same data order as the
simulator's row of that rank), and drives the algorithm's program with an
:class:`~.executor.Executor`. Rank 0 also evaluates (snapshots, see :mod:`.evaluation`) and
writes the same output folder as a simulated run: ``config.yaml``, ``metrics.csv`` row by
row, ``result.json`` (``runtime: "dist"``, real wall time in place of virtual time, bytes
per worker) and plots.

The compute model. Without ``compute.step_time_s`` and heterogeneity a worker computes
as fast as it can. With them, the simulator's compute model is realised by sleeping: each
local effect lasts at least its modelled duration, ``steps x step_time_s x factor`` (the
measured step time in place of ``step_time_s`` when that is null), so ``speed_factors:
[1, 1, 1, 3]`` makes worker 3 a real 3x straggler and ``step_time_s: 0.2`` asks "what if
each step took 0.2 s" of the real system.

Shutdown. When its program is done a worker tells everyone and keeps answering exchanges
until every live worker is done. On Ctrl-C or SIGTERM (what torchrun sends) a worker stops
at once, tells the others why, and rank 0 writes what it has measured; a worker that fails
does the same, so a synchronous run ends on every worker with a line naming the culprit.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms.base import Compute, Effect, Grad
from ..config import RunConfig, dump_yaml
from ..outputs import final_models, save_models
from ..errors import ConfigError, Diverged, RelaxError
from ..metrics import Recorder, aggregate_worker_metrics
from ..sim.compute import ComputeModel
from . import auth as A
from .auth import job_auth, listen_host
from .evaluation import Evaluator, SnapshotSpec, Snapshotter, _Proxy
from .executor import Executor, finish_together, tell_abort
from .options import STARTUP_S, DistOptions, from_env
from .p2p import lost_workers_check
from .transport import PeerLost, Transport
from .wire import WireError


def job_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError:
        raise ConfigError("--runtime dist runs one worker per process: launch it with "
                          "torchrun --nproc-per-node N (or python -m relaxsgd.dist.launch -n N) "
                          "so that RANK and WORLD_SIZE are set") from None
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def pick_backend(opts: DistOptions, local_rank: int) -> tuple[str, torch.device]:
    backend = opts.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return backend, torch.device("cuda", local_rank)
    return backend, torch.device("cpu")


def own_shard(prep: Any, rank: int) -> tuple[Any, dict[int, torch.Tensor]]:
    """The task with only this rank's training samples, and its shard (0..m-1)."""
    idx = prep.shards[rank]
    d = prep.spec.data
    keep_test = rank == 0
    data = dataclasses.replace(
        d, x_train=d.x_train[idx].clone(), y_train=d.y_train[idx].clone(),
        x_test=d.x_test if keep_test else d.x_test[:0],
        y_test=d.y_test if keep_test else d.y_test[:0])
    return dataclasses.replace(prep.spec, data=data), {rank: torch.arange(idx.numel())}


class _Signals:
    """While a run goes: SIGTERM raises KeyboardInterrupt in the main thread (as Ctrl-C
    does), and a watchdog ends the process ``grace`` seconds after either signal if the
    main thread is still stuck in a blocking call (a rendezvous, a store wait) where Python
    cannot run the handler."""

    def __init__(self, grace: float = 5.0) -> None:
        self.grace = grace

    def __enter__(self) -> _Signals:
        import socket
        import threading

        self.old = signal.getsignal(signal.SIGTERM)

        def raise_interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, raise_interrupt)
        self.r, self.w = socket.socketpair()
        self.w.setblocking(False)
        self.old_fd = signal.set_wakeup_fd(self.w.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="relax-signals").start()
        return self

    def _watch(self) -> None:
        while True:
            try:
                got = self.r.recv(16)
            except OSError:
                return
            if not got:
                return
            if signal.SIGINT in got or signal.SIGTERM in got:
                time.sleep(self.grace)
                sys.stderr.write("relaxsgd: interrupted while blocked; stopping now\n")
                sys.stderr.flush()
                os._exit(130)

    def __exit__(self, *exc: Any) -> None:
        signal.set_wakeup_fd(self.old_fd)
        signal.signal(signal.SIGTERM, self.old)
        self.w.close()
        self.r.close()


_STORE: Any = None
_RUNS = itertools.count()


def run_store(rank: int, world: int, timeout_s: float) -> Any:
    """The rendezvous store of this process's next run: one TCP store for the process's
    life (rank 0 hosts it on MASTER_PORT, or torchrun's agent does), a fresh key prefix per
    run, so that several runs in one process (``relaxsgd compare --runtime dist``) meet."""
    global _STORE
    if _STORE is None:
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        _STORE = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"),
                               int(os.environ.get("MASTER_PORT", "29500")), world,
                               is_master=rank == 0 and not agent,
                               timeout=datetime.timedelta(seconds=timeout_s))
    return dist.PrefixStore(f"relaxsgd/run{next(_RUNS)}/", _STORE)


def run_dist(cfg: RunConfig, progress: bool = True, write: bool = True) -> dict | None:
    """Run this process's worker of ``cfg``; rank 0 returns the result (others None)."""
    from ..run import prepare

    opts = from_env()
    rank, world, local_rank = job_env()
    if world != cfg.workers:
        raise ConfigError(f"the config has workers={cfg.workers} but the job has {world} "
                          f"processes; launch {cfg.workers} or pass --workers {world}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    clock = {"entered": time.perf_counter()}
    prep = prepare(cfg)  # config errors end every rank before any connection
    auth = job_auth(opts)
    clock["prepared"] = time.perf_counter()
    backend, device = pick_backend(opts, local_rank)
    startup = max(opts.timeout_s, STARTUP_S)
    with _Signals():
        try:
            store = run_store(rank, world, startup)
            # gloo's own timeout is a backstop: the executor's waits enforce opts.timeout_s
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=startup))
            clock["group"] = time.perf_counter()
            job = _Job(cfg, prep, opts, rank, world, backend, device, auth)
            job.clock = clock
            result = job.run(store, progress, write)
        except (KeyboardInterrupt, RelaxError) as e:
            _hard_exit(e)
    dist.destroy_process_group()
    return result


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def startup_report(clock: dict[str, float]) -> dict[str, float | None]:
    """Rank 0's start-up, apart from the run's wall time (which starts after it): Python
    and imports up to the run, data and config, rendezvous (process groups, transport)."""
    if "started" not in clock:
        return {}
    age = process_age_s()
    before = None if age is None else age - (time.perf_counter() - clock["entered"])
    data = clock["prepared"] - clock["entered"] + clock["built"] - clock["group"]
    return {"imports_s": before, "data_s": data,
            "rendezvous_s": clock["started"] - clock["prepared"] - (clock["built"]
                                                                 - clock["group"]),
            "total_s": None if before is None else before + clock["started"]
            - clock["entered"]}


def _hard_exit(e: BaseException) -> None:
    """Report like the command line does, then leave without tearing gloo down: after a
    fault its threads can abort the process (or block) when they meet the dead peer."""
    if isinstance(e, KeyboardInterrupt):
        sys.stderr.write("relaxsgd: interrupted; the outputs written so far are kept\n")
        code = 130
    else:
        sys.stderr.write(f"relaxsgd: error: {e}\n")
        code = getattr(e, "exit_code", 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _Job:
    def __init__(self, cfg: RunConfig, prep: Any, opts: DistOptions, rank: int, n: int,
                 backend: str, device: torch.device, auth: A.Auth) -> None:
        from ..bank import Bank
        from ..worker import LocalWorker

        self.cfg, self.prep, self.opts, self.rank, self.n = cfg, prep, opts, rank, n
        self.backend, self.device = backend, device
        self.n_train = prep.spec.data.x_train.shape[0]
        spec, shards = own_shard(prep, rank)
        warm = Bank(spec, cfg.train, [rank], shards, cfg.seed, prep.total_steps,
                    batching=cfg.batching, device=device)
        warm.local_steps([0], 2)  # first-call costs (vmap tracing, allocator) off the clock
        del warm
        self.bank = Bank(spec, cfg.train, [rank], shards, cfg.seed, prep.total_steps,
                         batching=cfg.batching, device=device)
        prep.info.dim = self.bank.d
        self.w = LocalWorker(self.bank, 0, n, cfg.seed, prep.total_steps)
        prep.algo.init_worker(self.w)
        self.groups = [dist.new_group(list(range(n))) for _ in range(opts.spawn_groups)]
        buffers = self.bank.buffers_of(0)
        model_bytes = sum(t.numel() * t.element_size()
                          for t in [self.w.params, *buffers.values()])
        every = max(1, -(-prep.total_steps // cfg.evals))
        self.snap_spec = SnapshotSpec(n, (self.w.params.shape, self.w.params.dtype),
                                      {k: (v.shape, v.dtype) for k, v in buffers.items()},
                                      prep.total_steps // every + 1)
        self.tr = Transport(rank, n, self._on_message, opts.timeout_s, device, auth=auth,
                            max_frame=opts.max_frame(model_bytes),
                            peer_timeout_s=opts.peer_timeout_s)
        self.ex = Executor(prep.algo, self.w, self.tr, opts, self.groups, device)
        self.done_from: set[int] = set()
        self.eval_wire = 0
        self.out: str | None = None
        self.evaluator: Evaluator | None = None
        self.rec: Recorder | None = None
        self.compute_time = 0.0
        self.units = 0
        self.program_s: float | None = None  # when this worker's program ended
        paced = cfg.compute.heterogeneity != "none" or cfg.compute.fixed_step_time is not None
        self.clock: dict[str, float] = {}
        self.pace = ComputeModel(cfg.compute, n, cfg.seed, 1.0) if paced else None

    # -- messages ------------------------------------------------------------------
    def _on_message(self, src: int, msg: tuple) -> None:
        if self.ex.on_message(src, msg):
            return
        if msg[0] == "snap":
            if self.evaluator is None:
                raise WireError(f"a snapshot sent to worker {self.rank}, not rank 0")
            self.evaluator.put(self.snap_spec.check(msg[1], src))
        elif msg[0] == "done":
            self.done_from.add(src)
        elif msg[0] == "abort":
            self.tr.mark_dead(src, f"it stopped: {msg[1]}")

    def _ship(self, snap: dict) -> None:
        snap["wire"] -= self.eval_wire
        snap["compute_time"], snap["units"] = self.compute_time, self.units
        snap["program_s"] = self.program_s
        if self.rank == 0:
            assert self.evaluator is not None
            self.evaluator.put(snap)
        else:
            self.eval_wire += self.tr.send(0, ("snap", snap))

    # -- the run -------------------------------------------------------------------
    def run(self, store: Any, progress: bool, write: bool) -> dict | None:
        from ..run import Progress, default_out_dir

        cfg, prep = self.cfg, self.prep
        if self.rank == 0:
            if write:
                self.out = cfg.out or default_out_dir(cfg)
                os.makedirs(self.out, exist_ok=True)
                dump_yaml({**prep.resolved, "runtime": "dist"},
                          os.path.join(self.out, "config.yaml"))
            self.rec = Recorder(prep.spec, os.path.join(self.out, "metrics.csv")
                                if self.out else None, self.n, self.bank.d, self.n_train,
                                list(prep.algo.metric_keys), cfg.eval_samples)
            self.evaluator = Evaluator(self.rec, self.n, self.opts.timeout_s)
            self.tr.on_dead.append(lambda r, why: self.evaluator.mark_dead(r))
        self.tr.start(store, listen_host(self.opts), startup_s=STARTUP_S)
        self.clock["built"] = time.perf_counter()
        dist.barrier()
        self.ex.t0 = time.perf_counter()
        self.clock["started"] = self.ex.t0
        snap = Snapshotter(self.w, self.bank, self.ex, prep.total_steps, cfg.evals, self._ship)
        bar = Progress(prep.total_steps, f"{cfg.algo} on {cfg.task} (dist, rank 0)",
                       progress and self.rank == 0)
        status, message, err = "completed", "", None
        try:
            self.ex.start(prep.algo.program(self.w))
            snap.maybe()
            eff = self.ex.advance()
            while eff is not None:
                snap.maybe()
                value = self._local(eff)
                snap.maybe()
                bar.update(self.w.step)
                eff = self.ex.advance(value)
            self.program_s = self.ex.now()
            # the final snapshot once EVERY worker is done: until then a finished worker
            # still answers exchanges, which may change its model (asynchronous gossip)
            finish_together(self.ex, self.done_from)
            snap.final("completed")
            if self.evaluator is not None and not self.evaluator.wait(self.opts.timeout_s):
                raise PeerLost("rank 0 did not receive every worker's final snapshot "
                               f"within {self.opts.timeout_s:g}s")
            if self.evaluator is not None and self.evaluator.error is not None:
                raise RuntimeError(f"evaluation failed: {self.evaluator.error}")
            lost_workers_check(self.tr, self.ex.coll_seq)
        except KeyboardInterrupt as e:
            status, message, err = "interrupted", "interrupted (Ctrl-C or SIGTERM)", e
        except Diverged as e:
            status, message, err = "diverged", str(e), e
        except BaseException as e:  # noqa: BLE001 - reported, written, re-raised
            status, message, err = "failed", f"{type(e).__name__}: {e}", e
        finally:
            bar.close()
        if err is not None:
            tell_abort(self.tr, message)
        result = self._write(status, message) if self.rank == 0 else None
        self.tr.close(wait_s=5.0 if err is None else 0.5)
        if err is not None:
            if isinstance(err, (KeyboardInterrupt, RelaxError)):
                raise err
            raise PeerLost(f"worker {self.rank} failed: {message}") from err
        return result

    def _local(self, eff: Effect) -> Any:
        bank, steps, value = self.bank, 0, None
        try:
            if isinstance(eff, Grad):
                g, loss = self._timed(lambda: bank.grads([0]), 1)
                value = g[0].clone()
                self._check(loss)
            else:
                assert isinstance(eff, Compute)
                steps = eff.steps
                # paced: one step at a time, so that the model mid-Compute is realistic
                chunks = [1] * steps if self.pace is not None else [steps] if steps else []
                for k in chunks:
                    self._check(self._timed(lambda k=k: bank.local_steps([0], k), k))
        finally:
            self.ex.end_local()
        if steps:
            self.w.note_steps(steps)
        return value

    def _timed(self, fn: Any, units: int) -> Any:
        t = time.perf_counter()
        out = fn()
        el = time.perf_counter() - t
        self.compute_time += el
        self.units += units
        if self.pace is not None:  # the compute model, realised by sleeping
            per = self.cfg.compute.fixed_step_time or el / units
            extra = self.pace.duration(self.rank, units) * per - el
            if extra > 0:
                time.sleep(extra)
        return out

    def _check(self, loss: Any) -> None:
        if loss is not None and loss.numel() and not bool(torch.isfinite(loss).all()):
            raise Diverged(self.w.step, self.rank, float(loss.reshape(-1)[0]))

    # -- outputs (rank 0) ----------------------------------------------------------
    def _security(self) -> dict[str, Any]:
        """How the point-to-point links were protected, and what was refused."""
        a = self.tr.auth
        return {"authenticated": not a.insecure, "tls": a.tls,
                "refused_connections": self.tr.refused}

    def _write(self, status: str, message: str) -> dict:
        from ..run import make_result, write_result

        ev, rec = self.evaluator, self.rec
        assert ev is not None and rec is not None
        if status != "completed":
            ev.stop(timeout=2.0)
        if ev.error is not None and status == "completed":  # (late: shown, not hidden)
            status, message = "failed", f"evaluation failed: {ev.error}"
        rec.close()
        finals = [ev.finals[r] for r in sorted(ev.finals)]
        units = sum(s["units"] for s in finals)
        step_time = sum(s["compute_time"] for s in finals) / units if units else 0.0
        steps = sum(s["step"] for s in finals) / len(finals) if finals else float(self.w.step)
        result = make_result(self.prep, rec, status, message, step_time, self.bank.batching,
                             aggregate_worker_metrics([_Proxy(s) for s in finals]), steps)
        result["runtime"] = "dist"
        result["final"]["virtual_time_s"] = max((s["wall"] for s in finals),
                                                default=self.ex.now())
        result["dist"] = {
            "backend": self.backend, "world_size": self.n,
            "lost_workers": {r: why for r, why in sorted(self.tr.dead.items())},
            "bytes_sent_per_worker": {s["rank"]: s["bytes"] for s in finals},
            "wire_bytes_per_worker": {s["rank"]: s["wire"] for s in finals},
            "step_time_s_per_worker": {s["rank"]: s["compute_time"] / max(s["units"], 1)
                                       for s in finals},
            "program_time_s_per_worker": {s["rank"]: s["program_s"] for s in finals},
            "startup_s": startup_report(self.clock),
        }
        result["dist"].update(self._security())
        # what was really used, not the config's simulated defaults
        result["network"] = "real"
        result["network_model"] = {"kind": "real", "backend": self.backend,
                                   "lab": os.environ.get("RELAXSGD_LAB") or None,
                                   "master_addr": os.environ.get("MASTER_ADDR")}
        result["compute_model"] = {"kind": "real", "paced": self.pace is not None,
                                   "step_time_s": step_time}
        if self.out:
            result["out"] = self.out
            write_result(self.out, result, rec)
            if finals:  # every run saves its final models (format: relaxsgd.outputs)
                save_models(os.path.join(self.out, "models.pt"),
                            final_models(self.bank.template, finals))
        return result
