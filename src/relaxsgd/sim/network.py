"""The simulator's network model: latency plus bytes over bandwidth, per worker link.

Point to point: a message of ``B`` bytes sent at ``t`` by worker ``i`` leaves i's link at
``s + overhead + B / bandwidth`` where ``s = max(t, link i free)`` (each worker's uplink
serialises what it sends; ``overhead_s``, 0 unless calibrated, is the runtime's own cost
per message: encoding, the frame tag, copies, thread hand-offs, as ``relaxsgd calibrate``
fits it through the executor), and arrives ``latency`` later (times a log-normal jitter factor when
``jitter > 0``). With ``loss > 0`` each transmission is lost with that probability and sent
again after a retransmission timeout of ``max(0.2 s, 3 * latency)`` (TCP's minimum RTO).
The receiver's downlink is not modelled, except the parameter server's (below).

TCP's slow start (``initial_window_B`` > 0; 0, the default, keeps every connection's
window open, as the named profiles do): each connection (a sender and a receiver, one way,
as the dist runtime's transport opens them; the server's uploads and replies; one for a
worker's collectives) starts with a window of ``initial_window_B`` bytes a round trip
(``2 latency``). A message larger than the window goes out in flights: a flight of the
window, then a round trip for its acknowledgements, with the window doubled, until what is
left fits or the window holds the link's bandwidth-delay product; the rest at the link's
rate. The window grows only when a message fills it (Linux does not grow an application-
limited window) and, after the connection was idle for longer than the retransmission
timeout (``2 latency + 200 ms``), is halved for each timeout past the first, never below
``initial_window_B`` (``restart_after_idle``: Linux's ``tcp_slow_start_after_idle`` and
``tcp_cwnd_restart``, which Linux skips under BBR; a collective's connections count as
busy until it ends). Collectives run on process groups, each with connections of its own:
the job's, and the dist runtime's groups for spawned sub-programs, taken in turn
(:data:`~.engine.SPAWN_GROUPS`), so the first rounds of a spawning algorithm (DiLoCo,
OLCO3 over all-reduce) each open a fresh window: measured in the lab, DiLoCo's first 4
rounds waited ~270 ms and the later ones ~155 ms. ``relaxsgd calibrate`` fits
``initial_window_B`` from bulk transfers on fresh connections against a warm one. Measured
in the network lab (25 ms one way, 80 Mbit/s): the first 75 KB messages of an OLCO3 run
took a round trip more than the later ones, a gloo all-reduce of 375 KB two (238 against
135 ms).

The parameter server (``aggregation: ps``, :class:`~relaxsgd.algorithms.base.ServerRound`)
is a node of its own, one hop from every worker, with a full-duplex link (latency
``server_latency_s`` and bandwidth ``server_bandwidth_Bps``, the workers' unless set). An
upload of ``B`` bytes leaves its worker's link as a message does; its bytes then pass the
server's receiving side, which takes one upload at a time in the order they were sent, so
it is received at ``max(left + latency, receiving side free + B / bandwidth)``. When the
round's last upload is in and the server has computed, it sends n unicast replies of ``D``
bytes one after the other out of its sending side (rank order; a real server writes them
to n sockets through one NIC), each arriving a latency after it left. With every upload
sent at ``t`` on idle links, the last reply arrives at
``t + 2 latency + (sum B_i + n D) / bandwidth + compute``: two latencies plus the bytes
through the server's link.

Collectives cost what the real backend's algorithm costs (``network.backend``, see
:mod:`.collectives`: gloo by default, as the dist runtime uses on CPU; NCCL ring and tree;
``ideal`` for the textbook ring and parameter server). A collective's cost is split into
a latency part and a transmission part: the transmission occupies every worker's link
(after what is already queued there), the latency part does not, so several collectives
and messages are in flight together and share the links as the dist runtime's process
groups do; two overlapping collectives end no earlier than their transmissions allow.

Profiles (one-way latency, per-worker bandwidth):

==========  =========  =============  =====================================================
profile     latency    bandwidth      source of the numbers
==========  =========  =============  =====================================================
datacenter  25 us      10 Gbit/s      10 GbE within a rack: ~50 us TCP round trip
cloud       250 us     2 Gbit/s       VMs in one cloud zone: 0.3-0.6 ms round trip; a few
                                      Gbit/s sustained per small/medium instance
wan         40 ms      100 Mbit/s     sites on different continents: 60-120 ms round trip
                                      (e.g. US-EU ~80 ms); inter-region paths of 50-200 Mbit/s
mobile      60 ms      10 Mbit/s      4G/LTE uplink: 5-20 Mbit/s, 40-80 ms latency;
                                      jitter 0.3 and 1% loss
==========  =========  =============  =====================================================

``--network FILE`` loads the ``network`` section of a profile file written by ``relaxsgd
calibrate`` (measured latency, bandwidth and fitted collective costs).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

from ..checks import require_float
from ..errors import ConfigError


@dataclass(frozen=True)
class NetworkConfig:
    latency_s: float
    bandwidth_Bps: float  # bytes per second of each worker's link
    jitter: float = 0.0  # sigma of a log-normal factor on the latency
    loss: float = 0.0  # probability that a transmission is lost and retransmitted
    profile: str = "custom"
    backend: str = "gloo"  # whose collective algorithms: see .collectives.BACKENDS
    # measured (kind, n, seconds, seconds per byte) from a calibrated profile file
    fits: tuple[tuple[str, int, float, float], ...] = ()
    overhead_s: float = 0.0  # the runtime's cost per message (software), on every message
    # the parameter server's link (None: the same as a worker's)
    server_latency_s: float | None = None
    server_bandwidth_Bps: float | None = None
    # TCP's slow start (see the module doc): the first window (bytes; 0 = always open)
    initial_window_B: float = 0.0
    restart_after_idle: bool = True  # the window closes again after an idle RTO

    def __post_init__(self) -> None:
        if not (self.latency_s >= 0 and math.isfinite(self.latency_s)):
            raise ConfigError(f"network latency must be >= 0 seconds, got {self.latency_s}")
        if not (self.bandwidth_Bps > 0):
            raise ConfigError(f"network bandwidth must be > 0 bytes/s, got {self.bandwidth_Bps}")
        if self.jitter < 0:
            raise ConfigError(f"network jitter must be >= 0, got {self.jitter}")
        if not (self.overhead_s >= 0 and math.isfinite(self.overhead_s)):
            raise ConfigError(f"network overhead_s must be >= 0 seconds, got {self.overhead_s}")
        if not (self.initial_window_B >= 0 and math.isfinite(self.initial_window_B)):
            raise ConfigError("network initial_window_B must be >= 0 bytes (0: windows "
                              f"always open), got {self.initial_window_B}")
        if not 0 <= self.loss < 1:
            raise ConfigError(f"network loss must be in [0, 1), got {self.loss}")
        if self.server_latency_s is not None and not (self.server_latency_s >= 0
                                                      and math.isfinite(self.server_latency_s)):
            raise ConfigError("network server_latency_s must be >= 0 seconds (or null: the "
                              f"workers'), got {self.server_latency_s}")
        if self.server_bandwidth_Bps is not None and not self.server_bandwidth_Bps > 0:
            raise ConfigError("network server_bandwidth_Bps must be > 0 bytes/s (or null: "
                              f"the workers'), got {self.server_bandwidth_Bps}")
        from .collectives import BACKENDS

        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown network backend {self.backend!r}; choose one of: "
                              f"{', '.join(BACKENDS)}")


GBIT = 1e9 / 8
MBIT = 1e6 / 8

PROFILES: dict[str, NetworkConfig] = {
    "datacenter": NetworkConfig(25e-6, 10 * GBIT, profile="datacenter"),
    "cloud": NetworkConfig(250e-6, 2 * GBIT, profile="cloud"),
    "wan": NetworkConfig(40e-3, 100 * MBIT, profile="wan"),
    "mobile": NetworkConfig(60e-3, 10 * MBIT, jitter=0.3, loss=0.01, profile="mobile"),
}

PROFILE_DESCRIPTIONS = {
    "datacenter": "25 us latency, 10 Gbit/s per link (10 GbE in a rack)",
    "cloud": "250 us latency, 2 Gbit/s per link (VMs in one cloud zone)",
    "wan": "40 ms latency, 100 Mbit/s per link (geo-distributed sites)",
    "mobile": "60 ms latency, 10 Mbit/s, jitter 0.3, 1% loss (4G uplink)",
}


# The valid range of each numeric network option (the simulator loops forever on a NaN
# delay).
NETWORK_RANGES: dict[str, dict[str, float]] = {
    "latency_s": {"at_least": 0.0}, "bandwidth_Bps": {"above": 0.0},
    "jitter": {"at_least": 0.0}, "loss": {"at_least": 0.0, "below": 1.0},
    "overhead_s": {"at_least": 0.0},
    "server_latency_s": {"at_least": 0.0}, "server_bandwidth_Bps": {"above": 0.0},
    "initial_window_B": {"at_least": 0.0}}


def make_network_config(profile: str, **overrides: Any) -> NetworkConfig:
    """A named profile or a profile file, with some fields overridden (``custom`` starts
    from ``cloud``)."""
    if profile == "custom":
        base = replace(PROFILES["cloud"], profile="custom")
    elif profile in PROFILES:
        base = PROFILES[profile]
    else:
        base = load_network_file(profile)
    fields = {"latency_s", "bandwidth_Bps", "jitter", "loss", "backend", "overhead_s",
              "server_latency_s", "server_bandwidth_Bps", "initial_window_B",
              "restart_after_idle"}
    for k in overrides:
        if k not in fields:
            raise ConfigError(f"unknown network option {k!r}; choose one of: "
                              f"{', '.join(sorted(fields))}")
    vals: dict[str, Any] = {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k == "backend":
            vals[k] = str(v)
        elif k == "restart_after_idle":
            if not isinstance(v, bool):
                raise ConfigError(f"network.restart_after_idle must be true or false, got "
                                  f"{v!r}")
            vals[k] = v
        else:
            vals[k] = require_float(v, f"network.{k}", **NETWORK_RANGES.get(k, {}))
    return replace(base, **vals) if vals else base


def load_network_file(path: str) -> NetworkConfig:
    """The ``network`` section of a calibrated profile file (see ``relaxsgd calibrate``)."""
    from .profile_file import read_section

    sec = read_section(path, "network", what="network profile",
                       choices=", ".join([*PROFILES, "custom"]))
    restart = sec.get("restart_after_idle", True)
    if not isinstance(restart, bool):
        raise ConfigError(f"network profile file {path!r}: network.restart_after_idle must "
                          f"be true or false, got {restart!r}")
    fits = []
    try:
        for kind, per_n in (sec.get("collectives") or {}).items():
            for n, (a, b) in per_n.items():
                fits.append((str(kind), int(n), float(a), float(b)))
        return NetworkConfig(float(sec["latency_s"]), float(sec["bandwidth_Bps"]),
                             float(sec.get("jitter", 0.0)), float(sec.get("loss", 0.0)),
                             profile=f"file:{path}", backend=str(sec.get("backend", "gloo")),
                             fits=tuple(sorted(fits)),
                             overhead_s=float(sec.get("overhead_s", 0.0)),
                             server_latency_s=_maybe_float(sec.get("server_latency_s")),
                             server_bandwidth_Bps=_maybe_float(sec.get("server_bandwidth_Bps")),
                             initial_window_B=float(sec.get("initial_window_B", 0.0)),
                             restart_after_idle=restart)
    except ConfigError as e:  # a value out of its range: NetworkConfig's own line
        raise ConfigError(f"network profile file {path!r}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ConfigError(f"network profile file {path!r} needs network.latency_s and "
                          "network.bandwidth_Bps (numbers) and collectives as {kind: {n: "
                          "[a, b]}}, as written by 'relaxsgd calibrate'") from None


def _maybe_float(v: Any) -> float | None:
    return None if v is None else float(v)


def network_model_info(cfg: NetworkConfig, n: int) -> dict[str, Any]:
    """What ``result.json`` records of the network model a run used, with its numbers."""
    from .collectives import describe

    return {"profile": cfg.profile, "latency_s": cfg.latency_s,
            "bandwidth_Bps": cfg.bandwidth_Bps, "jitter": cfg.jitter, "loss": cfg.loss,
            "overhead_s": cfg.overhead_s, "backend": cfg.backend,
            "initial_window_B": cfg.initial_window_B,
            "restart_after_idle": cfg.restart_after_idle,
            "collectives": describe(cfg, n),
            "server": {"latency_s": server_latency(cfg),
                       "bandwidth_Bps": server_bandwidth(cfg)}}


def server_latency(cfg: NetworkConfig) -> float:
    """One-way latency between a worker and the parameter server."""
    return cfg.latency_s if cfg.server_latency_s is None else cfg.server_latency_s


def server_bandwidth(cfg: NetworkConfig) -> float:
    """Bytes per second of the parameter server's link (each direction)."""
    return cfg.bandwidth_Bps if cfg.server_bandwidth_Bps is None else cfg.server_bandwidth_Bps


def _after_idle(win: float, w0: float, idle: float, latency: float) -> float:
    """The window after ``idle`` seconds without sending: halved for each retransmission
    timeout past the first, never below ``w0`` (Linux's ``tcp_cwnd_restart``; its RTO is
    the round trip plus at least 200 ms)."""
    rto = 2 * latency + 0.2
    while idle > rto and win > w0:
        idle -= rto
        win = max(w0, win / 2)
    return win


def ring_allreduce_time(nbytes: float, n: int, latency: float, bandwidth: float) -> float:
    if n <= 1:
        return 0.0
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * nbytes / bandwidth


def ring_allgather_time(max_nbytes: float, n: int, latency: float, bandwidth: float) -> float:
    if n <= 1:
        return 0.0
    return (n - 1) * latency + (n - 1) * max_nbytes / bandwidth


def ps_time(up_nbytes: list[int], down_nbytes: int, latency: float, bandwidth: float) -> float:
    n = len(up_nbytes)
    return 2 * latency + sum(up_nbytes) / bandwidth + n * down_nbytes / bandwidth


class Network:
    """Stateful link occupancy for one simulated run (``n`` workers + a server link)."""

    def __init__(self, cfg: NetworkConfig, n: int, seed: int) -> None:
        self.cfg = cfg
        self.n = n
        # index n: the parameter server's link (its sending side)
        self.link_free = [0.0] * (n + 1)
        self.server_in_free = 0.0  # the server's receiving side
        self.rng = random.Random(seed * 31 + 17)
        # each connection's TCP window: key -> (bytes a round trip, when it last sent)
        self.windows: dict[Any, tuple[float, float]] = {}

    def _latency(self, base: float | None = None) -> float:
        lat = self.cfg.latency_s if base is None else base
        if self.cfg.jitter:
            lat *= math.exp(self.rng.gauss(0.0, self.cfg.jitter))
        return lat

    def _attempts(self) -> int:
        attempts = 1
        if self.cfg.loss:
            while self.rng.random() < self.cfg.loss:
                attempts += 1
        return attempts

    def _rto(self, latency: float) -> float:
        return max(0.2, 3 * latency)

    def window_delay(self, conn: Any, nbytes: float, start: float, latency: float,
                     bandwidth: float) -> float:
        """Seconds that TCP's window (slow start, see the module doc) adds to sending
        ``nbytes`` from ``start`` on connection ``conn`` (any key) beyond ``nbytes /
        bandwidth``: a round trip for each flight it holds back, less that flight's time
        at the link's rate; 0 with ``initial_window_B`` 0. Updates the window."""
        w0 = self.cfg.initial_window_B
        if w0 <= 0:
            return 0.0
        win, last = self.windows.get(conn, (w0, start))
        if self.cfg.restart_after_idle:
            win = _after_idle(win, w0, start - last, latency)
        rtt, bdp = 2 * latency, bandwidth * 2 * latency
        took, left = 0.0, float(nbytes)
        while left > win and win < bdp:  # a full flight, then its acknowledgements
            left -= win
            took += rtt  # (the flight itself is shorter: win < bdp)
            win *= 2
        took += left / bandwidth
        self.windows[conn] = (win, start + took)
        return max(0.0, took - nbytes / bandwidth)

    def used_until(self, conn: Any, t: float) -> None:
        """Connection ``conn`` carried bytes until ``t`` (a collective's last step)."""
        if conn in self.windows:
            self.windows[conn] = (self.windows[conn][0], max(self.windows[conn][1], t))

    def _conn_free(self, conn: Any) -> float:
        """When connection ``conn``'s last message has left (its bytes go in order)."""
        return self.windows[conn][1] if conn in self.windows else 0.0

    def p2p(self, src: int, nbytes: int, t: float,
            dst: int | None = None) -> tuple[float, float, int]:
        """Send ``nbytes`` from ``src`` to ``dst`` at ``t``: (time it left the link,
        arrival time, transmissions made)."""
        conn = (src, dst)
        start = max(t, self.link_free[src], self._conn_free(conn))
        tx = nbytes / self.cfg.bandwidth_Bps
        attempts = self._attempts()
        # the runtime's overhead once (the sender's work); a lost transmission is resent
        sent = start + self.cfg.overhead_s + attempts * tx
        self.link_free[src] = sent  # (a window's wait leaves the link to other messages)
        left = sent + self.window_delay(conn, nbytes, start, self.cfg.latency_s,
                                        self.cfg.bandwidth_Bps)
        return left, left + (attempts - 1) * self._rto(self.cfg.latency_s) + self._latency(), \
            attempts

    def to_server(self, src: int, nbytes: int, t: float) -> tuple[float, int]:
        """Upload ``nbytes`` from worker ``src`` to the parameter server at ``t``: (time
        the server has received it, transmissions made). See the module docstring."""
        lat, conn = server_latency(self.cfg), (src, "server")
        start = max(t, self.link_free[src], self._conn_free(conn))
        attempts = self._attempts()
        sent = start + self.cfg.overhead_s + attempts * nbytes / self.cfg.bandwidth_Bps
        self.link_free[src] = sent
        left = sent + self.window_delay(conn, nbytes, start, lat, self.cfg.bandwidth_Bps)
        arrive = left + (attempts - 1) * self._rto(lat) + self._latency(lat)
        got = max(arrive, self.server_in_free + nbytes / server_bandwidth(self.cfg))
        self.server_in_free = got
        return got, attempts

    def from_server(self, nbytes: int, t: float, dst: int | None = None) -> tuple[float, int]:
        """One reply of ``nbytes`` from the parameter server to ``dst``, ready at ``t``:
        (arrival time, transmissions made); replies leave its link one after the other."""
        lat, conn = server_latency(self.cfg), ("server", dst)
        start = max(t, self.link_free[self.n], self._conn_free(conn))
        attempts = self._attempts()
        bw = server_bandwidth(self.cfg)
        sent = start + self.cfg.overhead_s + attempts * nbytes / bw
        self.link_free[self.n] = sent
        left = sent + self.window_delay(conn, nbytes, start, lat, bw)
        return left + (attempts - 1) * self._rto(lat) + self._latency(lat), attempts

    def collective(self, t_ready: float, latency_s: float, transmit_s: float,
                   server: bool = False, conn: Any = ("collectives", None)) -> float:
        """A collective ready at ``t_ready``: its transmissions (``transmit_s``) take every
        worker's link (and the server's, for ``server``) after what is queued there; its
        ``latency_s`` overlaps with anything else. Returns its end."""
        links = self.n + 1 if server else self.n
        start = max(t_ready, max(self.link_free[:links]))
        sent = start + transmit_s
        self.link_free[:links] = [sent] * links
        if self.cfg.initial_window_B > 0:  # slow start on the workers' collective links
            bw = self.cfg.bandwidth_Bps
            nbytes = transmit_s * bw  # (what each link carries, at the link's rate)
            latency_s += self.window_delay(conn, nbytes, start, self.cfg.latency_s, bw)
            # (its steps keep the connections busy until its end: not idle meanwhile)
            self.used_until(conn, sent + latency_s)
        return sent + latency_s
