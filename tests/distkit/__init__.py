"""Helpers for testing and benchmarking the distributed runtime on one machine.

- :class:`Probe`: a test algorithm that uses EVERY effect of the effect model (blocking and
  non-blocking all-reduce of a tensor and of a list, all-gather, a parameter server's round,
  send/recv, exchange answered at once and deferred to a step boundary, a spawned
  PowerSGD aggregation with two all-reduces, wait on lists, sleep, now), arranged with
  barriers so that its result does not depend on timing: the simulator and the
  distributed runtime must give the same parameters.
- :func:`run_job`: write a config, launch ``n`` workers of ``relaxsgd run --runtime dist``
  (through this module's entry point, which also knows the probe) on free ports, with a
  hard timeout, and read back the outputs.

``python -m distkit run ...`` is ``relaxsgd run ...`` with the probe and
``RELAXSGD_TEST_KILL_AT=<rank>:<step>`` (that worker kills itself with SIGKILL at that
local step: a crash for the fault tests), ``RELAXSGD_TEST_WIRE_FAULT=<rank>:<kind>:<k>``
(that worker's k-th frame to each peer goes wrong on the wire, as an attacker on the path
or a compromised peer would make it: ``garble`` flips a byte after the MAC was computed,
``replay`` sends the previous frame again, ``oversize`` sends a header claiming 1 TiB,
``pickle`` sends a correctly authenticated pickle whose unpickling would create the file
``$RELAXSGD_TEST_MARKER``) and ``RELAXSGD_TEST_EVAL_FAIL=1`` (rank 0's evaluation
raises).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import yaml

from relaxsgd.algorithms import ALGORITHMS
from relaxsgd.algorithms.base import (
    Algorithm,
    AllGather,
    AllReduce,
    Checkpoint,
    Compute,
    Deferred,
    Exchange,
    Grad,
    Now,
    Program,
    Recv,
    Reply,
    Send,
    ServerRound,
    Sleep,
    Spawn,
    Wait,
    Worker,
)
from relaxsgd.distributed.launch import LocalJob
from relaxsgd.registry import Entry

from .hooks import _Marker, install_hooks, make_test_certs

__all__ = ["Probe", "Ping", "Gossip", "run_job", "run_jobs", "resume_job", "wait_for_rows",
           "_Marker", "make_test_certs"]


@dataclass(frozen=True)
class ProbeConfig:
    """mix: weight of a partner's model in each exchange."""

    mix: float = 0.25


class Probe(Algorithm):
    name = "probe"
    Config = ProbeConfig
    metric_keys = ("rounds",)

    def on_exchange(self, w: Worker, src: int, payload: Any) -> Reply | Deferred:
        nbytes = 4 * w.params.numel()
        if payload["mode"] == "pub":
            return Reply(w.state["pub"].clone(), nbytes)
        # deferred to the step boundary; what it answers must not depend on when that is
        # (for parity), so it is the copy published at a fixed point of the round
        return Deferred(lambda w: Reply(w.state["pub2"].clone(), nbytes))

    def server(self) -> Any:
        """A parameter server that replies the mean of the uploads (2 parameters each, no
        compression)."""
        from relaxsgd.algorithms.server import ParameterServer
        from relaxsgd.compress.spec import make_compressor

        class SliceServer(ParameterServer):
            def init_state(self, numel: int, layout: Any = None,
                           device: Any = None) -> dict[str, Any]:
                return super().init_state(2, None, device)

        ident = make_compressor("identity")
        return SliceServer(ident, ident, False, self.info.seed)

    def program(self, w: Worker) -> Program:
        from relaxsgd.compress.spec import make_compressor

        n, r, mix = w.n, w.rank, self.cfg.mix
        comp = make_compressor("powersgd:rank=1")
        cstate = comp.init_state(w.params.numel(), w.layout)
        barrier = torch.zeros(1)
        for k in range(w.total_steps // 4):
            yield Compute(2)
            w.state["pub"] = w.params.clone()
            yield AllReduce(barrier)  # everyone has published round k
            peer = (r + 1 + k % max(n - 1, 1)) % n
            other = yield Exchange(peer, {"mode": "pub"}, 8)
            w.params.add_(other - w.params, alpha=mix)
            w.state["pub2"] = w.params.clone()
            yield AllReduce(barrier)  # every "pub" exchange answered, pub2 published
            h = yield Exchange(peer, {"mode": "deferred"}, 8, blocking=False)
            yield Compute(1)  # the partner answers after its Compute(1) (if busy by then)
            other = yield Wait(h)
            yield AllReduce(barrier)
            w.params.add_(other - w.params, alpha=mix)
            yield Send((r + 1) % n, w.params[:3].clone(), 12, tag=k)
            got = yield Recv((r - 1) % n, tag=k)
            w.params[:3].add_(got, alpha=0.1)
            hg = yield AllGather({"r": r, "v": w.params[:2].clone()}, 8, blocking=False)
            gathered = (yield Wait([hg]))[0]
            if [g["r"] for g in gathered] != list(range(n)):
                raise AssertionError(f"all-gather out of rank order: {gathered}")
            w.params[:2].copy_(torch.stack([g["v"] for g in gathered]).mean(0))
            ps = yield ServerRound(w.params[2:4].clone(), 8, 8)
            w.params[2:4].copy_(ps)
            hs = yield Spawn(comp.mean(w.params.clone(), cstate, w.rng))
            g = yield Grad()
            w.apply_grad(g)
            mean, own, cstate = yield Wait(hs)
            w.params.add_(mean - own, alpha=0.5)
            ha = yield AllReduce([w.params.clone(), w.momentum.clone()], blocking=False)
            yield Sleep(0.001)
            w.observe("now", (yield Now()))
            (avg,) = yield Wait([ha])
            w.params.copy_(avg[0])
            w.momentum.copy_(avg[1])
            w.count("rounds")
        rest = w.total_steps % 4
        if rest:
            yield Compute(rest)


class Ping(Algorithm):
    """Asynchrony check: worker 0 asks worker 1, busy in one long Compute, for an immediate
    answer and for a deferred one. Observations on worker 0: ``now_reply_s`` and
    ``deferred_reply_s`` (seconds to get each answer), ``deferred_step`` (worker 1's local
    step when it answered: the end of its Compute if deferral works), ``now_step``."""

    name = "ping"
    Config = ProbeConfig
    metric_keys = ()

    def on_exchange(self, w: Worker, src: int, payload: Any) -> Reply | Deferred:
        if payload == "now":
            return Reply(w.step, 8)
        return Deferred(lambda w: Reply(w.step, 8))

    def program(self, w: Worker) -> Program:
        if w.rank == 0:
            yield Compute(1)
            yield Sleep(0.3)  # worker 1 is inside its long Compute by now
            for mode in ("now", "deferred"):
                t = yield Now()
                step = yield Exchange(1, mode, 8)
                w.observe(f"{mode}_reply_s", (yield Now()) - t)
                w.observe(f"{mode}_step", step)
            yield Compute(w.total_steps - 1)
        else:
            yield Compute(w.total_steps)


class Gossip(Algorithm):
    """Minimal asynchronous pairwise averaging that goes on without lost partners:
    ``Compute(2)``, then an exchange with a random other worker; ``PeerUnavailable`` skips
    the interaction (counter ``skipped``). The partner answers from its published copy and
    adds its half of the average at its next step boundary (as SwarmSGD/AD-PSGD do).
    It follows the checkpoint rule, as an asynchronous algorithm (each worker saves alone)."""

    name = "gossip"
    Config = ProbeConfig
    metric_keys = ("interactions", "skipped")
    resumable = True
    asynchronous = True

    def init_worker(self, w: Worker) -> None:
        w.state["pub"] = w.params.clone()

    def on_exchange(self, w: Worker, src: int, payload: Any) -> Reply:
        from relaxsgd.algorithms.swarm import add_later

        mine = w.state["pub"].clone()
        add_later(w, (payload - mine) / 2)
        w.state["pub"].add_((payload - mine) / 2)
        return Reply(mine, 4 * mine.numel())

    def program(self, w: Worker) -> Program:
        from relaxsgd.algorithms.base import PeerUnavailable
        from relaxsgd.algorithms.swarm import absorb, finish

        others = [j for j in range(w.n) if j != w.rank]
        while w.step < w.total_steps:
            yield Checkpoint()
            yield Compute(min(2, w.total_steps - w.step))
            absorb(w)
            peer = others[int(torch.randint(len(others), (), generator=w.rng))]
            sent = w.params.clone()
            try:
                theirs = yield Exchange(peer, sent, 4 * sent.numel())
            except PeerUnavailable:
                w.count("skipped")
                continue
            absorb(w)
            w.params.add_((theirs - sent) / 2)
            w.state["pub"].copy_(w.params)
            w.count("interactions")
        finish(w)


PROBE = Entry("probe", "distkit:Probe",
              "test algorithm using every effect (distkit)")


GOSSIP = Entry("gossip", "distkit:Gossip",
               "test algorithm: asynchronous pairwise averaging that skips lost partners")
PING = Entry("ping", "distkit:Ping",
             "test algorithm: immediate and deferred answers of a busy worker")


@contextmanager
def probe_registered() -> Iterator[None]:
    """The probe in the algorithm registry for the duration (in this process)."""
    had = "probe" in ALGORITHMS
    ALGORITHMS._entries["probe"] = PROBE
    try:
        yield
    finally:
        if not had:
            ALGORITHMS._entries.pop("probe", None)


@dataclass
class JobResult:
    codes: list[int]
    logs: list[str]
    out: str
    result: dict[str, Any] | None
    models: torch.Tensor | None
    seconds: float

    def metrics(self) -> list[dict[str, str]]:
        import csv

        with open(os.path.join(self.out, "metrics.csv"), encoding="utf-8") as f:
            return list(csv.DictReader(f))


# The worker processes run ``python -m distkit``: this folder (tests/) must be on their path.
_TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job_env(env: dict[str, str] | None) -> dict[str, str]:
    """The environment of a test job's workers: models saved, and ``distkit`` importable."""
    path = os.pathsep.join(p for p in (_TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p)
    return {"RELAXSGD_SAVE_MODELS": "1", "PYTHONPATH": path, **(env or {})}


def run_jobs(cfgs: list[dict[str, Any]], n: int, out: str, timeout: float = 120.0,
             env: dict[str, str] | None = None, after: Any = None) -> list[JobResult]:
    """Several configs, one after the other in the SAME ``n`` processes (saves the start-up
    of a process per config: most of a small test's time); outputs in ``out/<k>``.
    ``after(job)`` runs while they do."""
    import time

    paths = []
    for k, cfg in enumerate(cfgs):
        os.makedirs(os.path.join(out, str(k)), exist_ok=True)
        paths.append(os.path.join(out, str(k), "job.yaml"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            yaml.safe_dump({**cfg, "workers": n, "out": os.path.join(out, str(k))}, f)
    e = _job_env(env)
    cmd = [sys.executable, "-m", "distkit", "multi", *paths]
    t = time.perf_counter()
    job = LocalJob(cmd, n, env=e, log_dir=os.path.join(out, "logs"))
    try:
        if after is not None:
            after(job)
        codes = job.wait(timeout=timeout, grace=5.0)
    finally:
        job.stop(grace=1.0)
    seconds = time.perf_counter() - t
    logs = [job.output(r) for r in range(n)]
    return [_collect(codes, logs, os.path.join(out, str(k)), seconds)
            for k in range(len(cfgs))]


def _collect(codes: list[int], logs: list[str], out: str, seconds: float) -> JobResult:
    result = None
    rpath = os.path.join(out, "result.json")
    if os.path.exists(rpath):
        with open(rpath, encoding="utf-8") as f:
            result = json.load(f)
    mpath = os.path.join(out, "models.pt")
    models = torch.load(mpath)["X"] if os.path.exists(mpath) else None
    return JobResult(codes, logs, out, result, models, seconds)


def run_job(cfg: dict[str, Any], n: int, out: str, timeout: float = 120.0,
            env: dict[str, str] | None = None,
            rank_env: dict[int, dict[str, str]] | None = None,
            kill: tuple[int, int] | None = None, after: Any = None) -> JobResult:
    """Run ``cfg`` on ``n`` local worker processes; every process is gone on return.

    ``kill=(rank, step)``: that worker dies by SIGKILL at that local step. ``after(job)``
    runs once the processes are started (to signal them, say).
    """
    import time

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "job.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({**cfg, "workers": n}, f)
    e = _job_env(env)
    if kill is not None:
        e["RELAXSGD_TEST_KILL_AT"] = f"{kill[0]}:{kill[1]}"
    cmd = [sys.executable, "-m", "distkit", "run", "--config", path,
           "--runtime", "dist", "--out", out, "--force", "-q"]  # out holds job.yaml
    t = time.perf_counter()
    job = LocalJob(cmd, n, env=e, rank_env=rank_env, log_dir=os.path.join(out, "logs"))
    try:
        if after is not None:
            after(job)
        codes = job.wait(timeout=timeout, grace=5.0)
    finally:
        job.stop(grace=1.0)  # never leave a process behind
    seconds = time.perf_counter() - t
    return _collect(codes, [job.output(r) for r in range(n)], out, seconds)


def resume_job(out: str, n: int, timeout: float = 120.0,
               env: dict[str, str] | None = None) -> JobResult:
    """``relaxsgd resume out`` on ``n`` local worker processes (logs in out/logs-resume)."""
    import time

    cmd = [sys.executable, "-m", "distkit", "resume", out, "-q"]
    t = time.perf_counter()
    job = LocalJob(cmd, n, env=_job_env(env),
                   log_dir=os.path.join(out, "logs-resume"))
    try:
        codes = job.wait(timeout=timeout, grace=5.0)
    finally:
        job.stop(grace=1.0)
    return _collect(codes, [job.output(r) for r in range(n)], out, time.perf_counter() - t)


def wait_for_rows(out: str, rows: int, timeout: float = 60.0) -> bool:
    """Wait until ``out/metrics.csv`` has ``rows`` rows (the run is under way)."""
    import time

    path = os.path.join(out, "metrics.csv")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                if sum(1 for _ in f) > rows:
                    return True
        time.sleep(0.05)
    return False


def _multi(paths: list[str]) -> int:
    """Run configs one after the other in this process (each run meets the others under
    its own prefix of the same store: see ``runtime.run_store``)."""
    from relaxsgd.config import from_dict, load_yaml
    from relaxsgd.distributed.runtime import run_dist

    for path in paths:
        run_dist(from_dict({**load_yaml(path), "runtime": "dist"}), progress=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    from relaxsgd.cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    install_hooks()
    ALGORITHMS._entries.setdefault("probe", PROBE)
    ALGORITHMS._entries.setdefault("ping", PING)
    ALGORITHMS._entries.setdefault("gossip", GOSSIP)
    if argv and argv[0] == "multi":
        return _multi(argv[1:])
    return cli_main(argv)


