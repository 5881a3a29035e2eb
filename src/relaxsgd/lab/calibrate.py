"""``relaxsgd calibrate``: measure a real set of workers, write a profile the simulator loads.

Run it like a dist run, one process per worker (under ``relaxsgd lab ... --`` or
``torchrun``), with the run's own task, model and batch::

    relaxsgd lab --workers 2 --latency 0.025 --rate 80e6 -- \\
        relaxsgd calibrate --task mnist1d --workers 2 --out lab.yaml

Every worker measures at the same time (so cores are shared as in the real run):

- the step time of the run's model and batch on the worker's device (``--device``;
  ``auto``: its GPU when CUDA is present), in synchronous rounds as a synchronous
  algorithm computes them (after a warm-up, 30 rounds: a barrier, then one timed local
  step on every worker at once): ``step_time_s`` the mean over workers and rounds, and
  from it the throughput ``flops_per_s`` that the counted FLOPs imply (``overhead_s`` 0:
  the measured step already holds it); ``step_sigma`` the spread of the workers' times
  within a round (:func:`.fit.fit_jitter`, the log-normal sigma the simulator's
  ``compute.heterogeneity: calibrated`` draws each effect's factor with: a round waits
  for its slowest worker) and ``step_max_over_mean``, the rounds' summed slowest step
  over their summed means;
- each codec's cost per element (``codecs``: {name: {encode_s, decode_s}}, the slowest
  worker's medians): SwarmSGD's 8-bit lattice codec (the real one) encoding (with the
  sender's own copy) and decoding the run's model, one eps a tensor; the differential
  QSGD quantizer, top-k, random-k, QSGD, PowerSGD, scaled sign, fp16 and bf16 on the
  flattened model (:mod:`.codecs`). The simulator charges each codec its own
  (:mod:`relaxsgd.codec_meter`); ``encode_s``/``decode_s``, the lattice's, for a codec
  the file does not list;
- the network's latency between workers 0 and 1 over plain TCP: half the median round
  trip of 64-byte pings (and, for the record, a 4 MiB transfer's raw bandwidth); and TCP's
  slow start: the same transfer on a fresh connection takes longer than once it is warm,
  and the difference (``slow_start_extra_s``, the median of 3 fresh connections) is
  fitted to the simulator's first window (``initial_window_B``,
  :func:`.fit.fit_initial_window`; 0 where nothing is held back), with
  ``restart_after_idle`` read from the kernel (``tcp_slow_start_after_idle``, off under
  BBR);
- the runtime's own path (:mod:`.paths`): the executor's AllReduce and AllGather on every
  worker, and Exchange and Send/Recv round trips between workers 0 and 1, on the
  authenticated transport, at the sizes the algorithms use (8 bytes, 1 KiB, 4x and 16x
  the model) and at 64 and 256 KiB, medians after a barrier; robust fits (:mod:`.fit`)
  give what the simulator charges: ``t(B) = a + b B`` per collective (from 1 KiB: gloo
  takes fewer steps for a tensor of a few elements), and per message ``overhead_s`` (the
  runtime's cost on top of the latency) and ``bandwidth_Bps`` from the round trips,
  ``rtt = 2 (latency + overhead) + 2 B / bandwidth``; and the parameter server's round
  trip through :mod:`relaxsgd.distributed.server` (every worker's ServerRound, worker 1's
  time), fitted to the simulator's server link (``server_latency_s``,
  ``server_bandwidth_Bps``, :func:`.fit.fit_server`). The point-to-point and server
  round trips are fitted from their timings under load (:mod:`.paths`: the other workers
  run local steps meanwhile, as in a run, where a partner answers while it computes):
  with more processes than cores each message waits for the scheduler, several
  milliseconds a hop, which an idle measurement misses (``overhead_idle_s``, for the
  record).

Rank 0 writes the YAML file (:mod:`relaxsgd.sim.profile_file`): ``compute`` and
``network`` sections, read by ``--compute FILE`` and ``--network FILE``.
"""

from __future__ import annotations

import math
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from ..config import RunConfig
from .codecs import compressor_costs, qsgd_diff_costs
from .fit import fit_initial_window, fit_jitter, fit_p2p, fit_server
from .fit import fit_line as _fit_line

PING_BYTES = 64
BULK_BYTES = 4 << 20
COLD_REPEATS = 3  # bulk transfers on a fresh connection (slow start's extra: the median)


def _median_time(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def calibration_device(spec: str) -> torch.device:
    """The device a calibrating worker times its step on: ``--device`` (``auto``: this
    process's GPU, ``LOCAL_RANK`` modulo the GPUs, when CUDA is present; else the CPU)."""
    import os

    from ..devices import resolve_device

    device = resolve_device(spec)
    if spec == "auto" and device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device = torch.device("cuda", local % torch.cuda.device_count())
    return device


def _bank(cfg: RunConfig, prep: Any, rank: int, seed: int) -> Any:
    """A one-row bank of this rank's model and data shard on the calibration device."""
    from ..bank import Bank

    return Bank(prep.spec, cfg.train, [rank], prep.shards, seed, 10**9, batching="loop",
                device=calibration_device(cfg.device))


def _one_step(bank: Any) -> None:
    """One local step; on a GPU its kernels, not their launch."""
    bank.local_steps([0], 1)
    if bank.device.type == "cuda":
        torch.cuda.synchronize(bank.device)


def step_time(cfg: RunConfig, prep: Any, rank: int,
              repeats: int = 30) -> tuple[list[float], float]:
    """(seconds of each of ``repeats`` local steps of this rank's model, each started
    after a barrier: synchronous rounds, FLOPs per step); ``prep`` the prepared run."""
    from ..sim.compute import count_flops

    bank = _bank(cfg, prep, rank, cfg.seed)
    bank.local_steps([0], 3)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        _one_step(bank)
        times.append(time.perf_counter() - t)
    return times, count_flops(prep.spec, cfg.train.batch_size) * cfg.train.batch_size


def busy_step(cfg: RunConfig, prep: Any, rank: int) -> Any:
    """One local step of this rank's model (a bank of its own), for the round trips timed
    under load (:mod:`.paths`): what a worker computes while its messages travel."""
    bank = _bank(cfg, prep, rank, cfg.seed + 1)
    return lambda: _one_step(bank)


def step_rounds(times: list[float]) -> list[list[float]]:
    """Every worker's step times gathered: [[round k's time on rank 0, 1, ...], ...]."""
    n = dist.get_world_size()
    mine = torch.tensor(times, dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(n)]
    dist.all_gather(every, mine)
    return [[float(every[r][k]) for r in range(n)] for k in range(len(times))]


def step_stats(rounds: list[list[float]]) -> dict[str, float]:
    """The compute section's step figures from synchronous rounds (see the module doc)."""
    sigma, mean = fit_jitter(rounds)
    ratio = (sum(max(r) for r in rounds) / sum(statistics.fmean(r) for r in rounds)
             if rounds else 1.0)
    return {"step_time_s": mean, "step_sigma": sigma, "step_max_over_mean": ratio}


def collective_times(sizes: list[int], repeats: int) -> dict[str, list[list[float]]]:
    """{kind: [[bytes, median seconds], ...]} for raw gloo all-reduce and all-gather (not
    the executor's: ``benchmarks/sim_fidelity.py --gloo`` prints gloo's own costs)."""
    n = dist.get_world_size()
    out: dict[str, list[list[float]]] = {"allreduce": [], "allgather": []}
    for b in sizes:
        t = torch.zeros(max(b // 4, 1))
        out["allreduce"].append([float(b), _median_time(lambda t=t: dist.all_reduce(t),
                                                         repeats)])
        u = torch.zeros(max(b, 1), dtype=torch.uint8)
        outs = [torch.zeros_like(u) for _ in range(n)]
        out["allgather"].append([float(b), _median_time(
            lambda u=u, outs=outs: dist.all_gather(outs, u), repeats)])
    return out


def fit_line(points: list[list[float]]) -> tuple[float, float]:
    """Robust ``t = a + b x`` (a, b >= 0): :func:`relaxsgd.lab.fit.fit_line`."""
    return _fit_line(points)


ADDR_BYTES = 64  # an IPv4/IPv6 address, a space and a port


def _recv_exact(s: socket.socket, k: int) -> bytes:
    buf = bytearray()
    while len(buf) < k:
        chunk = s.recv(min(k - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed during calibration")
        buf += chunk
    return bytes(buf)


def p2p(rank: int, host: str, repeats: int = 10) -> tuple[float, float, float]:
    """(one-way latency s, bandwidth bytes/s, slow start's extra s) between ranks 0 and 1
    over TCP: half the median round trip of pings, then a bulk transfer twice on the same
    connection, fresh (its window still opening: TCP's slow start) and warm (the link's
    rate), and once more on each of :data:`COLD_REPEATS` - 1 new connections; the extra is
    the median of the fresh transfers' times less the warm one's."""
    srv = None
    # rank 1's listening address, as fixed-size bytes broadcast from it (no pickle between
    # workers, as everywhere in the runtime)
    buf = torch.zeros(ADDR_BYTES, dtype=torch.uint8)
    if rank == 1:
        srv = socket.create_server((host, 0))
        h, port = srv.getsockname()[:2]
        raw = f"{h} {port}".encode("ascii")
        buf[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    dist.broadcast(buf, 1)
    peer_host, peer_port = bytes(buf.tolist()).rstrip(b"\0").decode("ascii").split()
    lat = bw = extra = 0.0
    if rank == 1:
        assert srv is not None
        c, _ = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(repeats):
            c.sendall(_recv_exact(c, PING_BYTES))
        for _ in range(2):
            _answer_bulk(c)
        c.close()
        for _ in range(COLD_REPEATS - 1):  # fresh connections: their first transfer
            c, _ = srv.accept()
            _answer_bulk(c)
            c.close()
        srv.close()
    elif rank == 0:
        c = socket.create_connection((peer_host, int(peer_port)))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(repeats):
            t = time.perf_counter()
            c.sendall(b"p" * PING_BYTES)
            _recv_exact(c, PING_BYTES)
            rtts.append(time.perf_counter() - t)
        rtt = statistics.median(rtts[1:])
        bulk = bytes(BULK_BYTES)
        # the second with TCP's window already open: the link's rate
        els = [_timed_bulk(c, bulk) for _ in range(2)]
        c.close()
        cold = [els[0]]
        for _ in range(COLD_REPEATS - 1):
            c = socket.create_connection((peer_host, int(peer_port)))
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cold.append(_timed_bulk(c, bulk))
            c.close()
        lat, bw = rtt / 2, BULK_BYTES / max(els[1] - rtt, 1e-9)
        extra = max(statistics.median(cold) - els[1], 0.0)
    vals = torch.tensor([lat, bw, extra], dtype=torch.float64)
    dist.broadcast(vals, 0)
    return float(vals[0]), float(vals[1]), float(vals[2])


def _timed_bulk(c: socket.socket, bulk: bytes) -> float:
    """Seconds to send ``bulk`` on ``c`` until the peer's one-byte answer is back."""
    t = time.perf_counter()
    c.sendall(bulk)
    _recv_exact(c, 1)
    return time.perf_counter() - t


def _answer_bulk(c: socket.socket) -> None:
    """The peer's side of :func:`_timed_bulk`."""
    _recv_exact(c, BULK_BYTES)
    c.sendall(b"k")


def restarts_after_idle() -> bool:
    """Whether this machine's TCP closes an idle connection's window again: Linux's
    ``net.ipv4.tcp_slow_start_after_idle`` (per network namespace; on by default), which
    the kernel skips for a congestion control with its own pacing model (BBR: measured in
    the lab, a gloo group's connection idle for 0.7 s kept its window)."""
    def read(name: str, default: str) -> str:
        try:
            with open(f"/proc/sys/net/ipv4/{name}", encoding="ascii") as f:
                return f.read().strip()
        except (OSError, ValueError):
            return default
    return (read("tcp_slow_start_after_idle", "1") != "0"
            and not read("tcp_congestion_control", "cubic").startswith("bbr"))


def executor_path(store: Any, rank: int, n: int, host: str, sizes: list[int],
                  repeats: int, busy: Any = None) -> dict[str, list[list[float]]]:
    """Times through a real executor on an authenticated transport (:mod:`.paths`; with
    ``busy``, one local step, also the round trips under load)."""
    from ..distributed.auth import job_auth
    from ..distributed.executor import Executor
    from ..distributed.options import from_env
    from ..distributed.server import SERVER_RANK, ServerHost
    from ..distributed.transport import Transport
    from .paths import _Echo, _EchoServer, _Stub, executor_times

    opts = from_env()

    def route(src: int, msg: tuple) -> None:  # uploads to the server first, as a run does
        if ex.server_host is None or not ex.server_host.on_message(src, msg):
            ex.on_message(src, msg)

    tr = Transport(rank, n, route, opts.timeout_s,
                   auth=job_auth(opts), max_frame=2 * max(sizes) + (1 << 20),
                   peer_timeout_s=opts.peer_timeout_s)
    ex = Executor(_Echo(), _Stub(), tr, opts, [], torch.device("cpu"))  # type: ignore[arg-type]
    if rank == SERVER_RANK:
        ex.server_host = ServerHost(_EchoServer(), 1, None, n, tr, ex.counts)
    tr.start(store, host, prefix="relaxsgd/calibrate")
    try:
        return executor_times(ex, rank, sizes, repeats, busy)
    finally:
        dist.barrier()
        tr.close(wait_s=2.0)


def codec_time(params: list[torch.Tensor], repeats: int = 9) -> tuple[float, float]:
    """(encode, decode) seconds per element of the 8-bit lattice codec on ``params`` (one
    message: every tensor coded with its own eps, as SwarmSGD sends them), medians."""
    from ..quantize.lattice import LatticeQuantizer

    q, g = LatticeQuantizer(8), torch.Generator(device=params[0].device).manual_seed(0)
    xs = [p.detach().reshape(-1).float() for p in params]
    refs = [x + 1e-3 * torch.rand(x.shape, generator=g, device=x.device) for x in xs]
    eps = q.eps_for(2e-3)
    pays = [q.encode(x, eps, g) for x in xs]
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for x in xs:
            q.encode_value(x, eps, g)
        t1 = time.perf_counter()
        for p, r in zip(pays, refs, strict=True):
            q.decode(p, r)
        t2 = time.perf_counter()
        enc.append(t1 - t)
        dec.append(t2 - t1)
    d = max(sum(x.numel() for x in xs), 1)
    return statistics.median(enc) / d, statistics.median(dec) / d


def codec_table(params: list[torch.Tensor]) -> dict[str, dict[str, float]]:
    """{codec: {encode_s, decode_s}} per element on every worker, the slowest worker's
    (as the step time): the lattice (:func:`codec_time`) and the others (:mod:`.codecs`)."""
    codecs = {"lattice": dict(zip(("encode_s", "decode_s"), codec_time(params),
                                  strict=True)),
              "qsgd-diff": qsgd_diff_costs(params), **compressor_costs(params)}
    names = sorted(codecs)
    costs = torch.tensor([codecs[k][e] for k in names for e in ("encode_s", "decode_s")],
                         dtype=torch.float64)
    dist.all_reduce(costs, op=dist.ReduceOp.MAX)
    return {k: {"encode_s": float(costs[2 * i]), "decode_s": float(costs[2 * i + 1])}
            for i, k in enumerate(names)}


def calibrate(cfg: RunConfig, rank: int, host: str, store: Any,
              repeats: int = 7) -> dict[str, Any]:
    """Measure on every worker (a process group on ``store`` must be up); the profile
    (all ranks). Collectives and point-to-point messages are timed through the executor
    (:mod:`.paths`) and fitted robustly (:mod:`.fit`); ``latency_s`` is raw TCP's, and
    ``overhead_s`` what the runtime adds to each message on top of it."""
    from ..run import prepare

    n = dist.get_world_size()
    prep = prepare(cfg)  # (once: the data set is loaded here, not for each measurement)
    times, flops = step_time(cfg, prep, rank)
    steps = step_stats(step_rounds(times))
    st = steps["step_time_s"]
    lat, raw_bw, cold_extra = p2p(rank, host) if n >= 2 else (0.0, float("inf"), 0.0)
    params = list(prep.spec.model_fn().to(calibration_device(cfg.device)).parameters())
    d = sum(p.numel() for p in params)
    codecs = codec_table(params)
    # the model's sizes, and a spread of others so that the fit is well conditioned
    # even for a tiny model (whose sizes alone are all close to 1 KiB)
    sizes = sorted({8, 1024, 64 << 10, 256 << 10, 4 * d, 16 * d})
    timed = executor_path(store, rank, n, host, sizes, repeats,
                          busy_step(cfg, prep, rank) if n >= 2 else None)
    # (gloo takes fewer steps for a tensor of a few elements: fitted from 1 KiB)
    fits = {k: {str(n): list(fit_line([p for p in timed[k] if p[0] >= 1024]))}
            for k in ("allreduce", "allgather")}
    overhead, bw = 0.0, raw_bw
    server: dict[str, Any] = {}
    if n >= 2:
        # what a run's messages pay: the round trips timed while the other workers compute
        # (where processes share cores, each message waits for the scheduler); the idle
        # path's overhead is kept for the record
        idle, _ = fit_p2p(timed["exchange"] + timed["sendrecv"], lat)
        overhead, fitted = fit_p2p(timed["exchange_busy"] + timed["sendrecv_busy"], lat)
        bw = fitted if math.isfinite(fitted) else raw_bw
        s_lat, s_bw = fit_server([p for p in timed["server_busy"] if p[0] >= 1024], n,
                                 overhead, bw)
        server = {"server_latency_s": s_lat, "server_bandwidth_Bps": s_bw,
                  "overhead_idle_s": idle,
                  # TCP's slow start on fresh (and idle) connections
                  "initial_window_B": fit_initial_window(cold_extra, BULK_BYTES, lat,
                                                         raw_bw),
                  "restart_after_idle": restarts_after_idle(),
                  "slow_start_extra_s": cold_extra}
    return {
        "compute": {"flops_per_s": flops / st, "overhead_s": 0.0, **steps,
                    "flops_per_step": flops, "task": cfg.task,
                    **codecs["lattice"], "codecs": codecs,
                    "batch_size": cfg.train.batch_size,
                    "source": f"relaxsgd calibrate: {n} workers, synchronous rounds of one "
                              f"step (mean, spread within a round), on "
                              f"{calibration_device(cfg.device).type}"},
        "network": {"latency_s": lat, "bandwidth_Bps": bw, "overhead_s": overhead, **server,
                    "backend": "gloo", "collectives": fits,
                    "measured": {k: {str(n): v} for k, v in timed.items()},
                    "raw_tcp": {"latency_s": lat, "bandwidth_Bps": raw_bw},
                    "source": f"relaxsgd calibrate: TCP ping between workers 0 and 1 "
                              f"(latency); the dist runtime's executor, {n} workers: "
                              "Exchange and Send/Recv round trips while the other workers "
                              "compute (overhead, bandwidth; overhead_idle_s: with none "
                              "computing), AllReduce and AllGather (collectives), "
                              "parameter-server rounds while the others compute (the "
                              "server's latency and bandwidth), robust fits"},
    }
