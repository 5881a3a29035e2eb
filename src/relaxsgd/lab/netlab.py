"""An emulated network on one Linux machine: n workers, one network namespace each.

Worker i lives in an anonymous network namespace held by a ``sleep`` process of ours,
with one TUN device ``198.51.100.(i+1)/24`` (or ``192.0.2.(i+1)/24``) as its only link.
The lab's :mod:`.forwarder` holds every TUN's descriptor and moves packets between them
after the one-way ``latency`` (and jitter, loss); ``tc tbf`` on each TUN's egress limits
what a worker sends to ``rate_bps`` (its uplink, as the simulator models it). Only the two
documentation ranges above are ever used (RFC 5737).

Teardown is by construction as much as by code: every process of the lab (namespace
holders, forwarder, workers) is a child that the kernel kills when the lab process dies
(``PR_SET_PDEATHSIG``), the namespaces are anonymous (no ``/var/run/netns`` file), so a
namespace disappears with its last process, and a TUN device with its namespace or its
descriptor. :meth:`Lab.close` also ends everything in order (workers with SIGTERM, then
SIGKILL), on a normal exit, an error, Ctrl-C or a killed worker.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, RelaxError

PREFIXES = ("198.51.100", "192.0.2")
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
PR_SET_PDEATHSIG = 1


class LabUnavailable(RelaxError):
    """No root, no TUN or no tc here: the lab cannot be built (exit 2)."""

    exit_code = 2


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def check_available() -> None:
    """Raise :class:`LabUnavailable` (one line) unless root, /dev/net/tun, ip and tc."""
    if os.geteuid() != 0:
        raise LabUnavailable("the network lab needs root (network namespaces, TUN devices,"
                             " tc); run it as root, e.g. with sudo")
    if not os.path.exists("/dev/net/tun"):
        raise LabUnavailable("the network lab needs /dev/net/tun (the tun kernel module); "
                             "load it with 'modprobe tun'")
    for tool in ("ip", "tc", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            raise LabUnavailable(f"the network lab needs the '{tool}' command (iproute2, "
                                 "util-linux)")


@dataclass(frozen=True)
class LinkSpec:
    """Every worker's link: one-way latency (s), uplink rate (bit/s, 0 = unshaped),
    jitter (sigma of a log-normal factor on the latency), loss (probability)."""

    latency_s: float = 0.0
    rate_bps: float = 0.0
    jitter: float = 0.0
    loss: float = 0.0
    mtu: int = 9000
    prefix: str = PREFIXES[0]

    def __post_init__(self) -> None:
        if self.prefix not in PREFIXES:
            raise ConfigError(f"lab addresses must be in {PREFIXES[0]}.0/24 or "
                              f"{PREFIXES[1]}.0/24, got prefix {self.prefix!r}")
        if not (0 <= self.latency_s <= 10):
            raise ConfigError(f"lab latency must be 0-10 s, got {self.latency_s}")
        if self.rate_bps < 0 or self.jitter < 0 or not 0 <= self.loss < 1:
            raise ConfigError("lab rate and jitter must be >= 0 and loss in [0, 1)")
        if not 576 <= self.mtu <= 65000:
            raise ConfigError(f"lab mtu must be 576-65000, got {self.mtu}")


@dataclass
class Lab:
    """A built emulated network (use as a context manager; :meth:`close` tears down)."""

    n: int
    link: LinkSpec
    tag: str = field(default_factory=lambda: f"rl{os.getpid() % 100000}")
    holders: list[subprocess.Popen] = field(default_factory=list)
    forwarder: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    stats_path: str = ""
    state_path: str | None = None
    _stats: dict[str, Any] = field(default_factory=dict)

    def address(self, i: int) -> str:
        return f"{self.link.prefix}.{i + 1}"

    def device(self, i: int) -> str:
        return f"{self.tag}t{i}"

    # -- building ------------------------------------------------------------------
    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def build(self) -> None:
        if not 2 <= self.n <= 8:
            raise ConfigError(f"the lab builds 2 to 8 workers, got {self.n}")
        check_available()
        fds = []
        try:
            for _ in range(self.n):
                self.holders.append(self._holder())
            for i, h in enumerate(self.holders):
                fds.append(self._tun(self.device(i)))
                self._wait_unshared(h.pid)
                self._ip(["link", "set", self.device(i), "netns", str(h.pid)])
                self._configure(i, h.pid)
            self.stats_path = tempfile.mktemp(prefix=f"{self.tag}-fwd-", suffix=".json")
            cmd = [sys.executable, "-m", "relaxsgd.lab.forwarder",
                   "--fds", ",".join(map(str, fds)), "--latency", str(self.link.latency_s),
                   "--jitter", str(self.link.jitter), "--loss", str(self.link.loss),
                   "--stats", self.stats_path]
            self.forwarder = subprocess.Popen(cmd, pass_fds=fds, preexec_fn=_die_with_parent)
        finally:
            for fd in fds:  # the forwarder has its own copies
                os.close(fd)
        self._write_state()

    def _holder(self) -> subprocess.Popen:
        return subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"],
                                preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL)

    @staticmethod
    def _wait_unshared(pid: int) -> None:
        mine = os.readlink("/proc/self/ns/net")
        for _ in range(500):
            try:
                if os.readlink(f"/proc/{pid}/ns/net") != mine:
                    return
            except OSError:
                break
            time.sleep(0.002)
        raise LabUnavailable("could not create a network namespace (unshare --net failed)")

    @staticmethod
    def _tun(name: str) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        except OSError as e:
            os.close(fd)
            raise LabUnavailable(f"could not create TUN device {name}: {e.strerror}") from None
        return fd

    @staticmethod
    def _ip(args: list[str], pid: int | None = None) -> None:
        """``ip args`` (``tc ...`` when args starts with tc), in ``pid``'s namespace."""
        cmd = args if args[0] == "tc" else ["ip", *args]
        if pid:
            cmd = ["nsenter", "-t", str(pid), "-n", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise LabUnavailable(f"'{' '.join(cmd)}' failed: {r.stderr.strip()}")

    def _configure(self, i: int, pid: int) -> None:
        dev, link = self.device(i), self.link
        self._ip(["link", "set", "lo", "up"], pid)
        self._ip(["addr", "add", f"{self.address(i)}/24", "dev", dev], pid)
        self._ip(["link", "set", dev, "mtu", str(link.mtu), "up"], pid)
        if link.rate_bps > 0:
            # burst: one MTU at least, else ~2 ms at the rate; queue: 200 ms at the rate
            # (TCP small queues keep the sender's own qdisc short, so this rarely drops)
            burst = max(2 * link.mtu, int(link.rate_bps / 8 * 0.002))
            self._ip(["tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                      f"{int(link.rate_bps)}bit", "burst", str(burst), "latency", "200ms"],
                     pid)

    def _write_state(self) -> None:
        """What the lab made (pids, namespaces), for tests and for a manual check."""
        if self.state_path is None:
            self.state_path = tempfile.mktemp(prefix=f"{self.tag}-state-", suffix=".json")
        state = {"pids": [p.pid for p in [*self.holders, *self.workers]]
                 + ([self.forwarder.pid] if self.forwarder else []),
                 "namespaces": [os.readlink(f"/proc/{h.pid}/ns/net") for h in self.holders],
                 "devices": [self.device(i) for i in range(self.n)]}
        with open(self.state_path, "w", encoding="utf-8") as f:
            json.dump(state, f)

    # -- running -------------------------------------------------------------------
    def spawn(self, i: int, argv: list[str], env: dict[str, str] | None = None,
              **popen: Any) -> subprocess.Popen:
        """Start ``argv`` in worker i's namespace (a child that dies with the lab)."""
        pid = self.holders[i].pid
        p = subprocess.Popen(["nsenter", "-t", str(pid), "-n", "--", *argv],
                             env={**os.environ, **(env or {})}, start_new_session=True,
                             preexec_fn=_die_with_parent, **popen)
        self.workers.append(p)
        return p

    def run_workers(self, argv: list[str], port: int = 29500,
                    timeout_s: float | None = None,
                    extra_env: dict[str, str] | None = None) -> list[int]:
        """Run ``argv`` once per worker as a torchrun-style job (RANK, WORLD_SIZE,
        MASTER_ADDR = worker 0, RELAXSGD_HOST = own address, a fresh job secret unless the
        environment names one); their exit statuses. A worker that fails (status not 0)
        ends the others (SIGTERM, then SIGKILL)."""
        from ..distributed.launch import job_secret_env

        secret = job_secret_env({**os.environ, **(extra_env or {})})
        for i in range(self.n):
            self.spawn(i, argv, env={"RANK": str(i), "WORLD_SIZE": str(self.n),
                                     "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                     "MASTER_ADDR": self.address(0),
                                     "MASTER_PORT": str(port),
                                     "RELAXSGD_HOST": self.address(i),
                                     "GLOO_SOCKET_IFNAME": self.device(i),
                                     **secret, **(extra_env or {})})
        self._write_state()
        procs = self.workers[-self.n:]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while [p.poll() for p in procs].count(None):
            if any(p.returncode not in (None, 0) for p in procs):
                self._stop(procs, grace=5.0)
                break
            if deadline is not None and time.monotonic() > deadline:
                self._stop(procs, grace=2.0)
                break
            time.sleep(0.05)
        return [p.wait() for p in procs]

    @staticmethod
    def _stop(procs: list[subprocess.Popen], grace: float) -> None:
        from ..distributed.launch import stop_groups

        stop_groups(procs, grace)

    def forwarder_stats(self) -> dict[str, Any]:
        """The forwarder's statistics (after :meth:`close`), or {} when none."""
        if not self._stats and self.stats_path:
            try:
                with open(self.stats_path, encoding="utf-8") as f:
                    self._stats = json.load(f)
                os.unlink(self.stats_path)  # read once, kept on the Lab
            except (OSError, ValueError):
                pass
        return dict(self._stats)

    def close(self) -> None:
        """End every process of the lab; the namespaces and devices go with them."""
        self._stop(self.workers, grace=3.0)
        if self.forwarder is not None and self.forwarder.poll() is None:
            self.forwarder.terminate()
            try:
                self.forwarder.wait(timeout=3.0)
            except subprocess.TimeoutExpired:
                self.forwarder.kill()
                self.forwarder.wait()
        for h in self.holders:
            if h.poll() is None:
                h.kill()
            h.wait()
        self.forwarder_stats()  # kept on the Lab; its file removed
        if self.state_path:
            try:
                os.unlink(self.state_path)
            except OSError:
                pass
