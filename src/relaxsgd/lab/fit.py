"""Fits of measured times to what the simulator charges (pure math; ``relaxsgd calibrate``).

:func:`fit_line` fits ``t = a + b x`` to (size, seconds) points, robustly: a machine that
measures is never quiet, and one descheduled repeat can make a size's median several times
too long. It starts from the Theil-Sen line (the median of the pairwise slopes; it ignores
up to ~29% of bad points) and refines it by iteratively reweighted least squares on
*relative* residuals ``(t - a - b x) / t`` (a time's noise grows with the time) with
Tukey's biweight (c = 4.685 robust standard deviations, the scale from the median
absolute deviation): clean points weigh as in least squares, far-off points weigh nothing.
Both coefficients are kept >= 0 (no negative cost).

:func:`fit_p2p` turns the round trips of point-to-point messages through the runtime
(an Exchange of ``B`` bytes each way, or a Send answered by a Send of the same size)
into the simulator's per-message terms: ``rtt(B) = 2 (latency + overhead) + 2 B /
bandwidth``, where ``latency`` is the network's (raw TCP, measured apart) and ``overhead``
what the runtime adds per message (encoding, the frame tag, copies, thread hand-offs); see
:class:`relaxsgd.sim.network.NetworkConfig`.

:func:`fit_initial_window` turns the extra time of a bulk transfer on a fresh connection
(against the same transfer once the connection is warm) into the simulator's TCP window
at the start (``initial_window_B``, :meth:`relaxsgd.sim.network.Network.window_delay`).
"""

from __future__ import annotations

import statistics

TUKEY_C = 4.685
MAD_SIGMA = 1.4826  # MAD -> standard deviation of a normal distribution


def _weighted_line(xs: list[float], ts: list[float], ws: list[float]) -> tuple[float, float]:
    sw = sum(ws)
    if sw <= 0:
        return statistics.median(ts), 0.0
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    mt = sum(w * t for w, t in zip(ws, ts, strict=True)) / sw
    var = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    b = sum(w * (x - mx) * (t - mt) for w, x, t in zip(ws, xs, ts, strict=True)) / var \
        if var > 0 else 0.0
    b = max(b, 0.0)
    a = sum(w * (t - b * x) for w, x, t in zip(ws, xs, ts, strict=True)) / sw
    return max(a, 0.0), b


def _theil_sen(xs: list[float], ts: list[float]) -> tuple[float, float]:
    slopes = [(ts[j] - ts[i]) / (xs[j] - xs[i])
              for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    b = max(statistics.median(slopes), 0.0) if slopes else 0.0
    return max(statistics.median(t - b * x for x, t in zip(xs, ts, strict=True)), 0.0), b


def fit_line(points: list[list[float]], iters: int = 50) -> tuple[float, float]:
    """Robust ``t = a + b x`` (a, b >= 0) through [[x, t], ...] (see the module doc)."""
    xs, ts = [float(p[0]) for p in points], [float(p[1]) for p in points]
    if len(xs) < 2:
        return (max(ts[0], 0.0), 0.0) if ts else (0.0, 0.0)
    a, b = _theil_sen(xs, ts)
    base = [1.0 / max(abs(t), 1e-12) ** 2 for t in ts]  # relative residuals
    for _ in range(iters):
        rel = [(t - a - b * x) / max(abs(t), 1e-12) for x, t in zip(xs, ts, strict=True)]
        scale = MAD_SIGMA * statistics.median(abs(r) for r in rel)
        if scale <= 1e-12:  # the points lie on the line (up to rounding)
            return _weighted_line(xs, ts, [w if abs(r) <= 1e-9 else 0.0
                                           for w, r in zip(base, rel, strict=True)])
        ws = [w * max(0.0, 1 - (r / (TUKEY_C * scale)) ** 2) ** 2
              for w, r in zip(base, rel, strict=True)]
        na, nb = _weighted_line(xs, ts, ws)
        if abs(na - a) <= 1e-12 + 1e-9 * abs(a) and abs(nb - b) <= 1e-15 + 1e-9 * abs(b):
            return na, nb
        a, b = na, nb
    return a, b


def fit_p2p(points: list[list[float]], latency_s: float) -> tuple[float, float]:
    """(per-message overhead s, bandwidth bytes/s) from round trips [[B, rtt], ...] of
    ``B`` bytes each way: ``rtt = 2 (latency_s + overhead) + 2 B / bandwidth``."""
    a, b = fit_line(points)
    overhead = max(a / 2 - latency_s, 0.0)
    return overhead, (2.0 / b if b > 0 else float("inf"))


def fit_server(points: list[list[float]], n: int, overhead_s: float,
               bandwidth_Bps: float) -> tuple[float, float | None]:
    """(server latency s, server bandwidth bytes/s or None: not resolved) from worker 1's
    parameter-server rounds [[B, t], ...] of ``B`` bytes up and down, ``n`` workers
    uploading at once, on the simulator's model (:mod:`relaxsgd.sim.server`, the server
    hosted by worker 0 as in the runtime: worker 0's upload and reply do not travel): its
    upload leaves its link (``overhead + B / bandwidth``) and arrives a server latency
    later, the server's receiving side takes the n - 1 uploads one after the other
    (``n - 2`` more ``B / server bandwidth``), then the replies leave in rank order, worker
    1's first (``overhead + B / server bandwidth``), a latency each way::

        t = 2 overhead + 2 server_latency + B (1 / bandwidth + (n - 1) / server_bandwidth)
    """
    a, b = fit_line(points)
    latency = max((a - 2 * overhead_s) / 2, 0.0)
    extra = b - 1.0 / bandwidth_Bps if bandwidth_Bps > 0 else b
    return latency, ((n - 1) / extra if extra > 0 and n > 1 else None)


def fit_jitter(rounds: list[list[float]]) -> tuple[float, float]:
    """(sigma, mean step s) of per-rank step times in synchronous rounds [[t_rank, ...],
    ...] (``relaxsgd calibrate``, or a traced run), for the simulator's ``jitter``
    heterogeneity (each effect takes ``mean x exp(N(-sigma^2/2, sigma^2))``). Sigma is
    matched to what synchronous rounds wait for: the sum over rounds of the slowest
    worker's time, over the sum of the rounds' means, equals ``E[max of n draws]``
    (:func:`relaxsgd.sim.compute.expected_max_lognormal`, solved by bisection). The
    spread is taken within each round, so a slowdown common to a round (the machine's
    load moving) is not counted; matching the max rather than the spread of ``log t``
    keeps one descheduled outlier from inflating sigma beyond what rounds really wait
    for. Mean: of every time."""
    from ..sim.compute import expected_max_lognormal

    rows = [[float(t) for t in row] for row in rounds if len(row) >= 2]
    times = [float(t) for row in rounds for t in row]
    mean = sum(times) / len(times) if times else 0.0
    if not rows or any(t <= 0 for row in rows for t in row):
        return 0.0, mean
    n = round(sum(len(r) for r in rows) / len(rows))
    # sum of the rounds' slowest over the sum of their means: what a run of such rounds
    # takes over what it would with every worker at the mean (a round's max weighs by its
    # length, as in the run's time)
    ratio = sum(max(r) for r in rows) / sum(sum(r) / len(r) for r in rows)
    if ratio <= 1.0 + 1e-12:
        return 0.0, mean
    lo, hi = 0.0, 5.0
    if expected_max_lognormal(n, hi) < ratio:
        return hi, mean
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_max_lognormal(n, mid) < ratio else (lo, mid)
    return (lo + hi) / 2, mean


def slow_start_delay(nbytes: float, window: float, latency_s: float,
                     bandwidth_Bps: float) -> float:
    """Seconds that slow start from ``window`` adds to sending ``nbytes`` (the simulator's
    model, :meth:`relaxsgd.sim.network.Network.window_delay` on a fresh connection)."""
    from ..sim.network import Network, NetworkConfig

    net = Network(NetworkConfig(latency_s, bandwidth_Bps, initial_window_B=window), 1, 0)
    return net.window_delay("fresh", nbytes, 0.0, latency_s, bandwidth_Bps)


def fit_initial_window(extra_s: float, nbytes: float, latency_s: float,
                       bandwidth_Bps: float) -> float:
    """The first window (bytes) under which the simulator's slow start adds ``extra_s``
    seconds to a transfer of ``nbytes`` on a fresh connection (the cold transfer's time
    less the warm one's): the window, on a grid of 0.5% steps from 1 KiB to ``nbytes``,
    whose delay is closest to it. 0 (windows open: no slow start) when the extra is under
    a quarter of a round trip (nothing was held back) or no window holds anything back
    (the link's bandwidth-delay product is below 1 KiB)."""
    rtt = 2 * latency_s
    if not (extra_s > rtt / 4 and rtt > 0 and bandwidth_Bps > 0 and nbytes > 1024):
        return 0.0
    best, err, w = 0.0, float("inf"), 1024.0
    while w <= nbytes:
        e = abs(slow_start_delay(nbytes, w, latency_s, bandwidth_Bps) - extra_s)
        if e < err:
            best, err = w, e
        w *= 1.005
    return best if err < rtt / 2 else 0.0
