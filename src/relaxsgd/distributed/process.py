"""The process side of ``--runtime dist``: the job's environment, the rendezvous store,
signals while a run goes, the start-up report and the exit after a fault.

(Split from :mod:`.runtime`, which drives one run.)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from typing import Any

import torch

from ..devices import pick_device, shares_gpu
from ..errors import ConfigError
from .options import DistOptions


def job_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, checked
    (:func:`.environment.read_job_env`: one line on a careless value)."""
    from .environment import read_job_env

    job = read_job_env()
    return job.rank, job.world, job.local_rank


def local_world_size(world: int) -> int:
    """Ranks on this node: torchrun's (and the launcher's) ``LOCAL_WORLD_SIZE``."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    except ValueError:
        raise ConfigError(f"LOCAL_WORLD_SIZE={os.environ['LOCAL_WORLD_SIZE']!r} is not a "
                          "whole number; torchrun sets it to the ranks on this node") from None


def pick_backend(opts: DistOptions, local_rank: int, requested: str | None = None,
                 local_world: int = 1) -> tuple[str, torch.device]:
    """(collective backend, this rank's device).

    The device: :func:`relaxsgd.devices.pick_device` (``requested``: the config's
    ``device``, None = auto: the GPU ``local_rank % GPUs`` when CUDA is present, else the
    CPU). The backend: NCCL when this rank has a GPU of its own; gloo on the CPU, and
    when this node runs more ranks than it has GPUs, so that ranks share GPUs: NCCL
    refuses two ranks on one device (docs/distributed.md). ``RELAXSGD_BACKEND`` forces
    one; nccl where it cannot work is one line, not a hang.
    """
    device = pick_device(requested, local_rank)
    shared = device.type == "cuda" and shares_gpu(local_world)
    backend = opts.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" and not shared else "gloo"
    if backend == "nccl" and (device.type != "cuda" or shared):
        where = (f"this node runs {local_world} ranks on {torch.cuda.device_count()} GPU(s)"
                 if shared else "this rank runs on the CPU")
        raise ConfigError(f"RELAXSGD_BACKEND=nccl needs a GPU of its own for every rank, "
                          f"but {where}; use RELAXSGD_BACKEND=auto or gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if shared and local_rank == 0:
        print(f"relaxsgd: {local_world} ranks share {torch.cuda.device_count()} GPU(s) on "
              "this node (round-robin); collectives use gloo, as NCCL needs one GPU per "
              "rank", file=sys.stderr, flush=True)
    return backend, device


def own_shard(prep: Any, rank: int) -> tuple[Any, dict[int, torch.Tensor]]:
    """The task with only this rank's training samples, and its shard (0..m-1)."""
    idx = prep.shards[rank]
    d = prep.spec.data
    keep_test = rank == 0
    data = dataclasses.replace(
        d, x_train=d.x_train[idx].clone(), y_train=d.y_train[idx].clone(),
        x_test=d.x_test if keep_test else d.x_test[:0],
        y_test=d.y_test if keep_test else d.y_test[:0])
    local = torch.arange(idx.numel(), device=idx.device)
    return dataclasses.replace(prep.spec, data=data), {rank: local}


class StopFlag:
    """A stop asked for by a signal, to be honoured at the next checkpoint (``enabled``:
    the run can save one; else a signal interrupts at once, as before)."""

    def __init__(self) -> None:
        self.enabled = False
        self.signum: int | None = None
        self.at = 0.0  # when it came (time.monotonic)


# torchrun's agent sends its SIGTERM twice within a millisecond: a signal this soon after
# the first is the same request, not the "second signal" that stops at once
SAME_SIGNAL_S = 1.0


class _Signals:
    """While a run goes: SIGTERM raises KeyboardInterrupt in the main thread (as Ctrl-C
    does), and a watchdog ends the process ``grace`` seconds after either signal if the
    main thread is still stuck in a blocking call (a rendezvous, a store wait) where Python
    cannot run the handler. When ``stop.enabled`` (a run that checkpoints), the FIRST
    SIGINT or SIGTERM only sets ``stop.signum``: the run goes on to its next safe point,
    saves a checkpoint and ends (:mod:`.stopping`); the watchdog then waits ``save_grace``
    seconds; a second signal (:data:`SAME_SIGNAL_S` or more later) interrupts at once."""

    def __init__(self, stop: StopFlag | None = None, grace: float = 5.0,
                 save_grace: float = 60.0) -> None:
        self.stop, self.grace, self.save_grace = stop, grace, save_grace

    def __enter__(self) -> _Signals:
        import socket
        import threading

        self.old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        stop = self.stop

        def handler(signum: int, frame: Any) -> None:
            if stop is not None and stop.signum is not None and \
                    time.monotonic() - stop.at < SAME_SIGNAL_S:
                return
            if stop is not None and stop.enabled and stop.signum is None:
                stop.signum, stop.at = signum, time.monotonic()
                name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
                sys.stderr.write(f"relaxsgd: {name}: going on to the next safe point to save "
                                 "a checkpoint (again to stop at once)\n")
                return
            raise KeyboardInterrupt

        for s in self.old:
            signal.signal(s, handler)
        self.r, self.w = socket.socketpair()
        self.w.setblocking(False)
        self.old_fd = signal.set_wakeup_fd(self.w.fileno(), warn_on_full_buffer=False)
        threading.Thread(target=self._watch, daemon=True, name="relax-signals").start()
        return self

    def _watch(self) -> None:
        deadline: float | None = None
        first = 0.0
        while True:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                self.r.settimeout(left)
                got = self.r.recv(16)
            except TimeoutError:
                sys.stderr.write("relaxsgd: interrupted while blocked; stopping now\n")
                sys.stderr.flush()
                from ..runlock import release_all

                release_all()
                os._exit(130)
            except OSError:
                return
            if not got:
                return
            if signal.SIGINT in got or signal.SIGTERM in got:
                now = time.monotonic()
                if deadline is not None and now - first < SAME_SIGNAL_S:
                    continue
                saving = deadline is None and self.stop is not None and self.stop.enabled
                end = now + (self.save_grace if saving else self.grace)
                if deadline is None:
                    first, deadline = now, end
                deadline = min(deadline, end)

    def __exit__(self, *exc: Any) -> None:
        signal.set_wakeup_fd(self.old_fd)
        for s, h in self.old.items():
            signal.signal(s, h)
        self.w.close()
        self.r.close()


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
    from ..errors import StoppedAtCheckpoint

    if isinstance(e, StoppedAtCheckpoint):  # not an error: the exit status of the signal
        sys.stderr.write(f"relaxsgd: interrupted; {e.note}\n")
        code = e.exit_code
    elif isinstance(e, KeyboardInterrupt):
        sys.stderr.write("relaxsgd: interrupted; the outputs written so far are kept\n")
        code = 130
    else:
        sys.stderr.write(f"relaxsgd: error: {e}\n")
        code = getattr(e, "exit_code", 1)
    sys.stdout.flush()
    sys.stderr.flush()
    from ..runlock import release_all

    release_all()  # os._exit skips the run's context managers
    os._exit(code)
