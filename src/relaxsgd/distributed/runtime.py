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
A run of an algorithm that follows the checkpoint rule first saves a checkpoint at a common
safe point (:mod:`.stopping`), and saves them on its schedule too (:mod:`.saving`, which
also resumes it).
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from ..algorithms.base import Compute, Effect, Grad
from ..config import RunConfig, dump_yaml
from ..errors import Diverged, RelaxError, StoppedAtCheckpoint
from ..metrics import Recorder
from ..sim.compute import ComputeModel
from . import auth as A
from . import elastic_saving, saving
from .auth import listen_host
from .elastic import ElasticWorker, incarnation, is_elastic
from .environment import check as check_environment
from .evaluation import Evaluator, InitialModel, SnapshotSpec, Snapshotter
from .executor import Executor, finish_together, tell_abort
from .job_outputs import JobOutputs
from .membership import Registry, member_registry
from .options import DistOptions
from .p2p import lost_workers_check
from .process import (  # noqa: F401 - job_env, pick_backend: imported from here by others
    StopFlag,
    _hard_exit,
    _Signals,
    job_env,
    local_world_size,
    own_shard,
    pick_backend,
)
from .server import make_host
from .startup import resolved, start
from .transport import PeerLost, Transport
from .wire import WireError


def run_dist(cfg: RunConfig, progress: bool = True, write: bool = True,
             resume: bool = False) -> dict | None:
    """Run this process's worker of ``cfg``; rank 0 returns the result (others None).

    ``resume``: continue the run in ``cfg.out`` from its checkpoint files (.saving).
    Start-up: every distributed setting is checked first (:mod:`.environment`), then the
    worker joins the job's store (:mod:`.rendezvous`) BEFORE the slow part (data, model), so
    that a worker failing anywhere before the run starts stops all the others within
    seconds, naming it."""
    from . import rendezvous as S

    env, opts, auth = check_environment()
    stop = StopFlag()
    with _Signals(stop):
        try:
            rdv = S.rendezvous(env, A.store_key(auth), opts.rendezvous_s)
            store, group_store = rdv.run_store()
            prep, backend, device, out, ck, clock = start(cfg, env, opts, store, write,
                                                          resume)
            elastic = is_elastic(cfg)
            if not (elastic and incarnation() > 0):  # (a restarted worker's is taken)
                rdv.meet(store)
            try:
                # gloo's own timeout is a backstop: the executor's waits enforce timeout_s
                if not elastic:  # (an elastic job has no process group: .elastic)
                    dist.init_process_group(backend, store=group_store, rank=env.rank,
                                            world_size=env.world, timeout=datetime.timedelta(
                                                seconds=opts.rendezvous_s))
                clock["group"] = time.perf_counter()
                job = _Job(cfg, prep, opts, env.rank, env.world, backend, device, auth,
                           out, stop)
            except RuntimeError as e:  # (torch's DistError): a peer gone in gloo's set-up
                raise PeerLost(f"worker {env.rank} could not set up the job's process "
                               f"groups: {str(e).strip().splitlines()[0][:300]}") from None
            job.clock = clock
            if elastic:  # the member records (.membership), in the unprefixed store
                job.registry = Registry(rdv.raw, A.store_key(auth), opts.timeout_s)
            result = job.run(store, progress, ck)
        except (KeyboardInterrupt, RelaxError) as e:
            S.announce(e)  # (before the run started: the others stop, naming this one)
            _hard_exit(e)
        except BaseException as e:
            S.announce(e)
            raise
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


class _Job(JobOutputs):
    def __init__(self, cfg: RunConfig, prep: Any, opts: DistOptions, rank: int, n: int,
                 backend: str, device: torch.device, auth: A.Auth, out: str | None,
                 stop: StopFlag) -> None:
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
        buffers = self.bank.buffers_of(0)
        # the run's initial model, the same on every worker: step 0's snapshots travel
        # without it (.evaluation.InitialModel); rank 0 keeps it to fill them in
        initial = InitialModel(self.bank.X[0], buffers)
        self.w = LocalWorker(self.bank, 0, n, cfg.seed, prep.total_steps)
        prep.algo.init_worker(self.w)
        self.elastic = is_elastic(cfg)
        # (an elastic job's server rounds are quorum rounds: one after another)
        self.w.ordered_server_rounds = self.elastic
        self.groups = [] if self.elastic else [dist.new_group(list(range(n)))
                                               for _ in range(opts.spawn_groups)]
        model_bytes = sum(t.numel() * t.element_size()
                          for t in [self.w.params, *buffers.values()])
        every = max(1, -(-prep.total_steps // cfg.evals))
        self.snap_spec = SnapshotSpec(n, (self.w.params.shape, self.w.params.dtype),
                                      {k: (v.shape, v.dtype) for k, v in buffers.items()},
                                      prep.total_steps // every + 1)
        # device None: messages decode on the CPU; the executor's p2p boundary (and the
        # evaluator, on rank 0) move them where they are used
        self.registry: Registry | None = None  # an elastic job's (set by run_dist)
        # (elastic: ids 0..max_workers-1, those of the start members; a joiner's beyond)
        self.n_ids = cfg.elastic.ids(n) if self.elastic else n
        self.tr = Transport(rank, self.n_ids, self._on_message, opts.timeout_s, None,
                            auth=auth, max_frame=opts.max_frame(model_bytes),
                            peer_timeout_s=opts.peer_timeout_s,
                            incarnation=incarnation() if self.elastic else 0,
                            members=range(n) if self.elastic else None,
                            on_demand=self.elastic or opts.connect == "demand")
        self.ex = Executor(prep.algo, self.w, self.tr, opts, self.groups, device)
        self.ex.server_host = make_host(prep.algo, self.w, n, rank, self.tr, self.ex.counts)
        self.done_from: set[int] = set()
        self.eval_wire = 0
        self.out = out if rank == 0 else None  # where rank 0 writes the outputs
        self.evaluator: Evaluator | None = None
        self.rec: Recorder | None = None
        self.compute_time = 0.0
        self.units = 0
        self.program_s: float | None = None  # when this worker's program ended
        self.result_lock = threading.Lock()  # result.json: "running" ones, then the final
        self.result_final = False
        paced = cfg.compute.heterogeneity != "none" or cfg.compute.fixed_step_time is not None
        self.clock: dict[str, float] = {}
        self.pace = ComputeModel(cfg.compute, self.n_ids, cfg.seed, 1.0) if paced else None
        self.stop = stop
        self.initial = initial if rank == 0 else None
        self.held: list[dict] = []  # snapshots of the last step, sent with the final one
        self.snap = Snapshotter(self.w, self.bank, self.ex, prep.total_steps, cfg.evals,
                                self._ship, None if rank == 0 else initial,
                                *((None, None) if rank == 0 else (self._hold, self._release)))
        # an elastic job: quorum collectives on the transport; only rank 0 checkpoints
        # (a lost worker of another id comes back by live recovery)
        self.el = ElasticWorker(self) if self.elastic else None
        if out is not None and prep.algo.resumable:  # (elastic: rank 0's, .elastic_saving)
            self.ex.saver = (elastic_saving if self.elastic else saving).attach(
                self, out, resolved(prep))

    # -- messages ------------------------------------------------------------------
    def _on_message(self, src: int, msg: tuple) -> None:
        host = self.ex.server_host
        if host is not None and host.on_message(src, msg):
            return
        if self.el is not None and self.el.on_message(src, msg):
            return
        if self.ex.on_message(src, msg):
            return
        if msg[0] == "snap":
            if self.evaluator is None:
                raise WireError(f"a snapshot sent to worker {self.rank}, not rank 0")
            snap = self.snap_spec.check(msg[1], src)
            if snap["initial"]:
                if self.initial is None:
                    raise WireError("a snapshot of the initial model sent to worker "
                                    f"{self.rank}, not rank 0")
                self.initial.fill(snap)
            self.evaluator.put(snap)
        elif msg[0] == "done":
            self.done_from.add(src)
        elif msg[0] == "abort":
            self.tr.mark_dead(src, f"it stopped: {msg[1]}")
        elif msg[0] in ("ckask", "ckq", "ckpos", "ckgo") and self.ex.saver is not None:
            self.ex.saver.requests.on_message(src, msg)

    def _hold(self, snap: dict) -> None:
        """Stamp ``snap`` now, send it later (:meth:`_release`, before the final one)."""
        self._stamp(snap)
        self.held.append(snap)

    def _release(self) -> None:
        while self.held:
            self._send_snap(self.held.pop(0))

    def _stamp(self, snap: dict) -> None:
        snap["wire"] -= self.eval_wire
        snap["compute_time"], snap["units"] = self.compute_time, self.units
        snap["program_s"] = self.program_s

    def _ship(self, snap: dict) -> None:
        self._stamp(snap)
        self._send_snap(snap)

    def _send_snap(self, snap: dict) -> None:
        if self.rank == 0:
            assert self.evaluator is not None
            self.evaluator.put(snap)
        else:
            self.eval_wire += self.tr.send(0, ("snap", snap))

    # -- the run -------------------------------------------------------------------
    def run(self, store: Any, progress: bool, ck: Any = None) -> dict | None:
        from ..progress import Progress

        cfg, prep = self.cfg, self.prep
        if self.rank == 0:
            # metrics.csv (and config.yaml) only once every worker is connected: a job
            # that fails to start leaves its folder as empty as it found it
            self.rec = Recorder(prep.spec, None, self.n, self.bank.d, self.n_train,
                                list(prep.algo.metric_keys), cfg.eval_samples)
            self.evaluator = Evaluator(self.rec, self.n_ids, self.opts.timeout_s,
                                       absent=range(self.n, self.n_ids))
            self.tr.on_dead.append(lambda r, why: self.evaluator.mark_dead(r))
            if self.out:
                self.evaluator.on_row = self._running
        if ck is not None:
            (elastic_saving.resume if self.elastic else saving.resume_job)(self, store, *ck)
        self.tr.start(store, listen_host(self.opts), startup_s=self.opts.rendezvous_s,
                      # an elastic job's registry is the launcher's (unprefixed)
                      registry=self.registry or member_registry(store, self.opts))
        self.clock["built"] = time.perf_counter()
        try:
            if not self.elastic:  # (elastic: the transport's start met every worker)
                dist.barrier()
        except RuntimeError as e:
            raise PeerLost(f"the start barrier failed on worker {self.rank}: "
                           f"{str(e).strip().splitlines()[0][:300]}") from None
        from .rendezvous import started

        started()  # from here a fault is seen by the transport (and the collectives)
        if self.rank == 0 and self.out:
            assert self.rec is not None
            if ck is None:
                os.makedirs(self.out, exist_ok=True)
                dump_yaml(resolved(prep), os.path.join(self.out, "config.yaml"))
            self.rec.open(os.path.join(self.out, "metrics.csv"))
        self.ex.t0 = time.perf_counter()
        self.clock["started"] = self.ex.t0
        snap = self.snap
        bar = Progress(prep.total_steps, f"{cfg.algo} on {cfg.task} (dist, rank 0)",
                       progress and self.rank == 0)
        status, message, err = "completed", "", None
        try:
            if self.el is not None and self.el.rejoining:  # live recovery (.handover)
                self.el.rejoin()
            self.ex.start(prep.algo.program(self.w))
            self.stop.enabled = self.ex.saver is not None  # a signal: checkpoint, then end
            snap.maybe()
            eff = self.ex.advance()
            while eff is not None:
                snap.maybe()
                value = self._local(eff)
                snap.maybe()
                bar.update(self.w.step)
                eff = self.ex.advance(value)
            self.program_s = self.ex.now()
            self.stop.enabled = False
            if self.stop.signum is not None:  # too late for a checkpoint: stop now
                raise KeyboardInterrupt
            # the final snapshot once EVERY worker is done: until then a finished worker
            # still answers exchanges, which may change its model (asynchronous gossip)
            finish_together(self.ex, self.done_from)
            snap.final("completed")
            if self.evaluator is not None and not self.evaluator.wait(self.opts.timeout_s):
                raise PeerLost("rank 0 did not receive every worker's final snapshot "
                               f"within {self.opts.timeout_s:g}s")
            if self.evaluator is not None and self.evaluator.error is not None:
                raise RuntimeError(f"evaluation failed: {self.evaluator.error}")
            if not self.elastic:  # (elastic: a quorum went on without the lost ones)
                lost_workers_check(self.tr, self.ex.coll_seq)
        except StoppedAtCheckpoint as e:  # (a KeyboardInterrupt: caught first)
            how = "Ctrl-C" if e.signum == signal.SIGINT else "SIGTERM"
            status, message, err = "interrupted", f"interrupted by {how}; {e.note}", e
        except KeyboardInterrupt as e:
            status, message, err = "interrupted", "interrupted (Ctrl-C or SIGTERM)", e
        except Diverged as e:
            status, message, err = "diverged", str(e), e
        except BaseException as e:  # noqa: BLE001 - reported, written, re-raised
            status, message, err = "failed", f"{type(e).__name__}: {e}", e
        finally:
            bar.close()
        if err is not None:
            try:  # (a held snapshot still completes its row, as it would have unheld)
                self._release()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
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
