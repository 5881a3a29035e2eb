"""The drop-in API: any relaxsgd algorithm around your own training loop.

::

    import relaxsgd.distributed as rd

    rd.init()                                    # under torchrun: process group from env
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    relaxed = rd.wrap(model, opt, "localsgd", total_steps=len(loader) * epochs,
                      options={"p": 8})
    for epoch in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()                           # local step + the algorithm's communication
    relaxed.finish()                             # final communication, orderly goodbye

:func:`wrap` binds the model's parameters to one flat tensor (``p.data`` become views; the
optimizer keeps the same parameter objects), makes them identical on every worker (a
broadcast from rank 0, as DDP does), and replaces ``opt.step`` with a driver of the
algorithm's program, the same program the simulator and ``relaxsgd run --runtime dist``
run, fulfilled by the same :class:`~.executor.Executor`:

- the program asks for ``Compute(h)``: the next ``h`` calls of ``opt.step()`` are your own
  optimizer steps on your own gradients; after the h-th, the program resumes (it averages,
  compresses, exchanges, ...) before ``opt.step()`` returns;
- the program asks for ``Grad()``: ``opt.step()`` hands it your gradient (``p.grad``,
  flattened) and lets it apply whatever it decides (all-reduce SGD: the mean gradient,
  through your optimizer: momentum, weight decay and your LR scheduler apply).

``total_steps`` is the number of ``opt.step()`` calls you will make (the program is built
for it); after the last one call :meth:`Relaxed.finish`. With ``torch.optim.SGD`` the
momentum buffers are bound to ``w.momentum`` too (algorithms that average momentum see
them); with other optimizers ``w.momentum`` is a detached zero vector.
"""

from __future__ import annotations

import datetime
import itertools
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..algorithms import ALGORITHMS
from ..algorithms.base import Compute, Grad, RunInfo
from ..checks import require_int
from ..config import _typed
from ..training import bind_params, flat_params, seeded_generator
from ..worker import SALT_ALGO
from .auth import job_auth, listen_host
from .executor import Executor, finish_together, tell_abort
from .options import STARTUP_S, from_env
from .runtime import local_world_size, pick_backend
from .server import make_host
from .transport import Transport

_WRAPS = itertools.count()  # the k-th wrap of a process meets the k-th of the others


def init(backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialise torch.distributed from torchrun's environment (if not done yet).

    Returns (rank, world size, device): gloo on CPU, NCCL on this process's GPU when CUDA
    is present (``RELAXSGD_BACKEND`` or ``backend`` to force one). Timeouts from
    ``RELAXSGD_TIMEOUT``.
    """
    opts = from_env()
    if backend is not None:
        import dataclasses

        opts = dataclasses.replace(opts, backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    name, device = pick_backend(opts, local, None, local_world_size(1))
    if not dist.is_initialized():
        dist.init_process_group(name, timeout=datetime.timedelta(
            seconds=max(opts.timeout_s, STARTUP_S)))
    return dist.get_rank(), dist.get_world_size(), device


class _ModelWorker:
    """The Worker protocol over a user's model and optimizer."""

    ordered_server_rounds = False  # (not an elastic job: server rounds are pipelined)

    def __init__(self, rank: int, n: int, params: Tensor, momentum: Tensor,
                 layout: list, seed: int, total_steps: int, relaxed: Relaxed) -> None:
        self.rank, self.n, self.params, self.momentum, self.layout = (
            rank, n, params, momentum, layout)
        self.state: dict[str, Any] = {}
        self.rng = seeded_generator(seed, rank, SALT_ALGO)
        self.step = 0
        self.total_steps = total_steps
        self.counters: dict[str, float] = {}
        self.obs_sum: dict[str, float] = {}
        self.obs_count: dict[str, int] = {}
        self._relaxed = relaxed

    def apply_grad(self, grad: Tensor) -> None:
        self._relaxed._optimizer_step(grad)
        self.step += 1

    def lr(self) -> float:
        return float(self._relaxed.optimizer.param_groups[0]["lr"])

    def count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    def observe(self, key: str, value: float) -> None:
        self.obs_sum[key] = self.obs_sum.get(key, 0.0) + float(value)
        self.obs_count[key] = self.obs_count.get(key, 0) + 1


class Relaxed:
    """An algorithm driven by a user's ``optimizer.step()`` calls (see :func:`wrap`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, algo: str,
                 total_steps: int, options: dict[str, Any] | None = None,
                 topology: str = "complete", topology_options: dict[str, Any] | None = None,
                 seed: int = 0) -> None:
        if not dist.is_initialized():
            raise RuntimeError("call relaxsgd.distributed.init() (or init_process_group) first")
        # a ConfigError is a ValueError: callers catching ValueError still do
        require_int(total_steps, "total_steps (the number of opt.step() calls you will "
                    "make)", at_least=1)
        from ..topology import make_topology

        self.model, self.optimizer = model, optimizer
        self.rank, self.n = dist.get_rank(), dist.get_world_size()
        self.opts = from_env()
        auth = job_auth(self.opts)  # before any collective: a missing secret ends it here
        cls = ALGORITHMS.get(algo)
        cfg = _typed(cls.Config, dict(options or {}), f"algorithm {algo!r}")
        topo = make_topology(topology, self.n, seed=seed, **(topology_options or {}))
        flat, layout = flat_params(model)
        device = flat.device
        dist.broadcast(flat, 0)  # the same starting model everywhere
        bind_params(model, flat)
        self.params = [p for p in model.parameters()]
        mom = torch.zeros_like(flat)
        self._bind_momentum(mom)
        self.info = RunInfo(n=self.n, seed=seed, topology=topo, dim=flat.numel())
        self.algo = cls(cfg, self.info)
        self.w = _ModelWorker(self.rank, self.n, flat, mom, layout, seed, total_steps, self)
        self.algo.init_worker(self.w)
        groups = [dist.new_group(list(range(self.n))) for _ in range(self.opts.spawn_groups)]
        self.done_from: set[int] = set()
        # device None: decoded on the CPU, moved at the executor's p2p boundary
        self.tr = Transport(self.rank, self.n, self._on_message, self.opts.timeout_s, None,
                            auth=auth, peer_timeout_s=self.opts.peer_timeout_s,
                            max_frame=self.opts.max_frame(2 * flat.numel()
                                                          * flat.element_size()))
        self.ex = Executor(self.algo, self.w, self.tr, self.opts, groups, device)
        self.ex.server_host = make_host(self.algo, self.w, self.n, self.rank, self.tr,
                                        self.ex.counts)
        from torch.distributed import distributed_c10d

        from .auth import store_key
        from .store import SignedStore

        # the addresses published in torch's store are signed with the job secret
        store = SignedStore(distributed_c10d._get_default_store(), store_key(auth),
                            f"relaxsgd/wrap{next(_WRAPS)}", STARTUP_S, "the default store")
        self.tr.start(store, listen_host(self.opts), prefix="p2p", startup_s=STARTUP_S)
        dist.barrier()
        self._orig_step = optimizer.step

        def step(closure: Any = None) -> Any:
            return self.step(closure)

        if getattr(self._orig_step, "_wrapped_by_lr_sched", False):
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]  # a scheduler
            # made before wrap() still counts the steps (it wrapped the original)
        optimizer.step = step  # type: ignore[method-assign]
        self._left = 0
        self.ex.start(self.algo.program(self.w))
        self._pending = self._next(self.ex.advance())
        self.finished = False

    def _bind_momentum(self, mom: Tensor) -> None:
        if not isinstance(self.optimizer, torch.optim.SGD):
            return
        off = 0
        for p in self.params:
            k = p.numel()
            if self.optimizer.param_groups[0].get("momentum", 0):
                self.optimizer.state[p]["momentum_buffer"] = mom[off:off + k].view_as(p)
            off += k

    def _on_message(self, src: int, msg: tuple) -> None:
        host = self.ex.server_host
        if (host is not None and host.on_message(src, msg)) or self.ex.on_message(src, msg):
            return
        if msg[0] == "done":
            self.done_from.add(src)
        elif msg[0] == "abort":
            self.tr.mark_dead(src, f"it stopped: {msg[1]}")

    def _next(self, eff: Any) -> Any:
        """Skip empty computations; remember how many user steps the next one takes."""
        while isinstance(eff, Compute) and eff.steps <= 0:
            self.ex.end_local()
            eff = self.ex.advance(None)
        if isinstance(eff, Compute):
            self._left = eff.steps
        return eff

    # -- what the user calls ---------------------------------------------------------
    def step(self, closure: Any = None) -> Any:
        """The optimizer's step, driving the algorithm (replaces ``optimizer.step``)."""
        eff = self._pending
        if eff is None:
            raise RuntimeError(f"the algorithm has done its total_steps="
                               f"{self.w.total_steps} local steps; call finish()")
        ret = None
        if isinstance(eff, Compute):
            ret = self._orig_step(closure)
            self.w.step += 1
            self._left -= 1
            if self._left > 0:
                return ret
            value = None
        else:
            assert isinstance(eff, Grad)
            if closure is not None:
                with torch.enable_grad():
                    ret = closure()
            value = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p))
                               .detach().reshape(-1) for p in self.params])
        try:
            self.ex.end_local()
            self._pending = self._next(self.ex.advance(value))
        except BaseException as e:
            tell_abort(self.tr, f"{type(e).__name__}: {e}")
            raise
        return ret

    def _optimizer_step(self, grad: Tensor) -> None:
        off = 0
        for p in self.params:
            k = p.numel()
            g = grad[off:off + k].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            off += k
        self._orig_step()

    def finish(self) -> None:
        """After the last ``optimizer.step()``: wait for every worker, say goodbye."""
        if self.finished:
            return
        if self._pending is not None:
            raise RuntimeError(f"finish() after {self.w.step} of total_steps="
                               f"{self.w.total_steps} optimizer steps")
        finish_together(self.ex, self.done_from)
        self.tr.close()
        self.optimizer.step = self._orig_step  # type: ignore[method-assign]
        self.finished = True

    def stats(self) -> dict[str, Any]:
        """This worker's communication and the algorithm's counters so far
        (``server_bytes``: the parameter server's replies, on rank 0 that hosts it)."""
        c = self.ex.counts
        return {"step": self.w.step, "bytes_sent": c.bytes, "messages": c.messages,
                "server_bytes": c.server_bytes,
                "wire_bytes": c.wire + self.tr.wire_bytes, "stall_s": self.ex.stall,
                "counters": dict(self.w.counters),
                "time_s": time.perf_counter() - self.ex.t0}

    def __enter__(self) -> Relaxed:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.finish()
        else:
            tell_abort(self.tr, f"{exc_type.__name__}")
            self.tr.close(wait_s=1.0)


def wrap(model: nn.Module, optimizer: torch.optim.Optimizer, algo: str, *,
         total_steps: int, options: dict[str, Any] | None = None,
         topology: str = "complete", topology_options: dict[str, Any] | None = None,
         seed: int = 0) -> Relaxed:
    """Run algorithm ``algo`` (a registered name, ``options`` its config: e.g.
    ``{"compressor": "powersgd:rank=2"}``) through ``optimizer.step()``; see the module
    docstring. ``topology`` is for decentralized algorithms (swarm, ...)."""
    return Relaxed(model, optimizer, algo, total_steps, options, topology,
                   topology_options, seed)
