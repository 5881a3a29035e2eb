"""What a collective costs on each backend: a latency part and a transmission part.

:func:`allreduce_cost` and :func:`allgather_cost` return ``(latency_s, transmit_s)`` for
an all-reduce of ``nbytes`` or an all-gather of payloads of ``sizes`` bytes. (A parameter
server is not a collective: :class:`~relaxsgd.algorithms.base.ServerRound`, costed by
:meth:`.network.Network.to_server` / :meth:`~.network.Network.from_server`.)
The network (:class:`.network.Network`) lets the latency parts of collectives in flight
together overlap and makes their transmissions share the links.

**gloo** (``backend: gloo``, the default: what ``--runtime dist`` uses on CPU), measured
with ``torch.distributed`` 2.13 in the network lab (:mod:`relaxsgd.lab`): a one-way
latency L = 25 ms between every pair of workers, unshaped or 80 Mbit/s (``tbf``), median of
5 calls after a barrier (seconds; ``benchmarks/sim_fidelity.py --gloo`` prints them)::

    all-reduce        n=2    n=3    n=4    n=8      all-gather       n=2    n=3    n=4    n=8
    8 B               0.051  0.102  0.102  0.185    8 B              0.051  0.102  0.157  0.368
    1 KiB             0.102  0.205  0.309  0.734    1 KiB            0.051  0.103  0.158  0.380
    64 KiB            0.107  0.207  0.315  0.730    64 KiB           0.062  0.114  0.169  0.394
    4 MiB @80Mbit/s   0.521  0.671  0.739           4 MiB @80Mbit/s  0.476  0.910  1.326

(n=8: 8 processes on 2 cores, so a few percent above the latency count.)

So gloo's ring all-reduce takes **4(n-1) one-way latencies** (2(n-1) ring steps, each a
"ready to receive" notice and then the data: two latencies), not the textbook ring's
2(n-1); tiny tensors (a few elements) take fewer steps (8 B: 2L, 4L, 4L, ~7L), which we do
not model. Its bytes follow the ring, ``2(n-1)/n B / bandwidth`` (n=2, 4 MiB: 0.521 =
4L + 1.00 B/bw); for n >= 3 and multi-MiB tensors gloo pipelines segments and hides part
of the latency (n=4, 4 MiB: 0.739 measured against 0.929 by the formula), so the formula
is an upper bound there; a calibrated profile file (``relaxsgd calibrate``) replaces it by
the measured line ``a + b B`` for the run's own n, timed through the dist runtime's
executor (the whole effect: an AllGather's two gathers, copies and encoding included).
All-gather: **2(n-1) latencies** (n=8: 0.368-0.394 s against 14L = 0.35) +
``(n-1) B_max / bandwidth`` (n=4, 4 MiB: 1.326 = 6L + 1.17 s against 1.26 s). The dist
runtime's ``AllGather`` is two gloo all-gathers: the sizes (8 bytes), then the payloads
padded to the largest.

**nccl-ring** / **nccl-tree** (GPUs): NCCL's ring all-reduce is ``2(n-1)`` steps of one
latency each with ``2(n-1)/n B`` per link; its tree all-reduce (double binary trees,
Sanders, Speck & Traeff 2009) ``2 ceil(log2 n)`` latencies with the same bus bandwidth
factor (NCCL's documentation, nccl-tests ``PERFORMANCE.md``: busBw = algBw x 2(n-1)/n for
all-reduce, (n-1)/n for all-gather); all-gather is a ring, ``(n-1)`` latencies.

**ideal**: the textbook costs the simulator used before: ring all-reduce ``2(n-1) L +
2(n-1)/n B/bw`` (Patarasuk & Yuan 2009), ring all-gather ``(n-1) L + (n-1) B_max/bw``.
"""

from __future__ import annotations

import math
from typing import Any

BACKENDS = ("gloo", "nccl-ring", "nccl-tree", "ideal")
SIZES_BYTES = 8  # the dist runtime's first all-gather: every payload's size


def _fit(cfg: Any, kind: str, n: int) -> tuple[float, float] | None:
    for k, m, a, b in cfg.fits:
        if k == kind and m == n:
            return a, b
    return None


def allreduce_cost(cfg: Any, n: int, nbytes: float) -> tuple[float, float]:
    """(latency part, transmission part) of an all-reduce of ``nbytes`` over n workers."""
    if n <= 1:
        return 0.0, 0.0
    fit = _fit(cfg, "allreduce", n)
    if fit is not None:
        return fit[0], fit[1] * nbytes
    lat, bw = cfg.latency_s, cfg.bandwidth_Bps
    steps = {"gloo": 4 * (n - 1), "nccl-ring": 2 * (n - 1), "ideal": 2 * (n - 1),
             "nccl-tree": 2 * math.ceil(math.log2(n))}[cfg.backend]
    # gloo's two latencies per ring step are one message (a notice, then the data)
    msgs = steps // 2 if cfg.backend == "gloo" else steps
    return steps * lat + msgs * cfg.overhead_s, 2 * (n - 1) / n * nbytes / bw


def _allgather(cfg: Any, n: int, max_bytes: float, latencies: int) -> tuple[float, float]:
    return latencies * cfg.latency_s + (n - 1) * cfg.overhead_s, \
        (n - 1) * max_bytes / cfg.bandwidth_Bps


def allgather_cost(cfg: Any, n: int, sizes: list[int]) -> tuple[float, float]:
    """(latency part, transmission part) of an AllGather of payloads of ``sizes`` bytes."""
    if n <= 1:
        return 0.0, 0.0
    if cfg.backend == "ideal":
        o = cfg.overhead_s
        return (n - 1) * (cfg.latency_s + o), (n - 1) * max(sizes) / cfg.bandwidth_Bps
    fit = _fit(cfg, "allgather", n)
    if fit is not None:  # calibrated through the executor: the whole effect, both gathers
        return fit[0], fit[1] * max(sizes)
    per_step = 2 if cfg.backend == "gloo" else 1
    a1, t1 = _allgather(cfg, n, SIZES_BYTES, per_step * (n - 1))
    a2, t2 = _allgather(cfg, n, max(sizes), per_step * (n - 1))
    return a1 + t1 + a2, t2


def describe(cfg: Any, n: int) -> dict[str, Any]:
    """The formulas a run used at its n, with their numbers (for ``result.json``)."""
    lat_ar, _ = allreduce_cost(cfg, n, 0.0)
    fits = {f"{k}@{m}": [a, b] for k, m, a, b in cfg.fits if m == n}
    return {"allreduce_latency_s": lat_ar,
            "allreduce_s_per_byte": allreduce_cost(cfg, n, 1.0)[1],
            "allgather_latency_s": allgather_cost(cfg, n, [0])[0],
            "fits_used": fits}
