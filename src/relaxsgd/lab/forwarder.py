"""The lab's delay forwarder: IPv4 packets between TUN devices, each held back a latency.

This kernel has no ``netem``, so one-way delay (and jitter and loss) is ours: every worker
namespace of the lab has one TUN device whose file descriptor this process holds (moved
there after it was opened, so the descriptor stays ours). A packet read from worker i's
TUN, addressed to ``<prefix>.(j + 1)``, is written to worker j's TUN ``latency`` seconds
later (times ``exp(N(0, jitter^2))``, never before the previous packet of the same pair, so
that jitter does not reorder a TCP stream), or dropped with probability ``loss``. The rate
is shaped by the kernel (``tc tbf`` on each TUN's egress, set up by :mod:`.netlab`).

One thread: ``select`` over the TUN descriptors plus a heap of (due time, packet); each
wake-up reads every descriptor until it is empty, then writes what is due. Sustained rate
and CPU cost are measured by ``benchmarks/sim_fidelity.py --forwarder`` (numbers in the
README). On SIGTERM/SIGINT it writes its statistics (packets, bytes, CPU seconds, how late
packets left) as JSON to ``--stats`` and exits.

Run as ``python -m relaxsgd.lab.forwarder --fds 5,6 --latency 0.025 ...`` by the lab.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import random
import resource
import select
import signal
import time
from typing import Any

MAX_PACKET = 65536


class Forwarder:
    """Moves packets between TUN descriptors ``fds`` (worker i = ``fds[i]``)."""

    def __init__(self, fds: list[int], latency: float, jitter: float = 0.0,
                 loss: float = 0.0, seed: int = 0) -> None:
        self.fds, self.latency, self.jitter, self.loss = fds, latency, jitter, loss
        self.rng = random.Random(seed)
        self.heap: list[tuple[float, int, int, bytes]] = []
        self.last: dict[tuple[int, int], float] = {}
        self.seq = 0
        self.stats = {"packets": 0, "bytes": 0, "dropped_loss": 0, "dropped_full": 0,
                      "unroutable": 0, "late_max_s": 0.0, "late_sum_s": 0.0}
        self.stop = False

    def _due(self, src: int, dst: int, now: float) -> float:
        lat = self.latency
        if self.jitter:
            lat *= math.exp(self.rng.gauss(0.0, self.jitter))
        due = max(now + lat, self.last.get((src, dst), 0.0))
        self.last[(src, dst)] = due
        return due

    def _take(self, src: int, fd: int, now: float) -> None:
        while True:
            try:
                pkt = os.read(fd, MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the device went away (namespace removed): stop reading it
                return
            if len(pkt) < 20 or pkt[0] >> 4 != 4:
                continue  # not IPv4 (router solicitations and the like)
            dst = pkt[19] - 1
            if not 0 <= dst < len(self.fds) or dst == src:
                self.stats["unroutable"] += 1
                continue
            if self.loss and self.rng.random() < self.loss:
                self.stats["dropped_loss"] += 1
                continue
            self.seq += 1
            heapq.heappush(self.heap, (self._due(src, dst, now), self.seq, dst, pkt))

    def _flush(self, now: float) -> None:
        st, heap = self.stats, self.heap
        while heap and heap[0][0] <= now:
            due, _, dst, pkt = heapq.heappop(heap)
            try:
                os.write(self.fds[dst], pkt)
            except BlockingIOError:
                st["dropped_full"] += 1  # the receiver's queue is full: a real drop
                continue
            except OSError:
                continue
            late = now - due
            st["packets"] += 1
            st["bytes"] += len(pkt)
            st["late_sum_s"] += late
            st["late_max_s"] = max(st["late_max_s"], late)

    def run(self) -> None:
        # select, not epoll: its timeout has microseconds, epoll's milliseconds (a 1 ms
        # error on every packet's delay); with at most 8 descriptors it costs the same
        index = {fd: i for i, fd in enumerate(self.fds)}
        for fd in self.fds:
            os.set_blocking(fd, False)
        while not self.stop:
            now = time.monotonic()
            timeout = max(self.heap[0][0] - now, 0.0) if self.heap else 0.5
            try:
                ready, _, _ = select.select(self.fds, [], [], timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            for fd in ready:
                self._take(index[fd], fd, now)
            self._flush(time.monotonic())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m relaxsgd.lab.forwarder")
    ap.add_argument("--fds", required=True, help="comma-separated TUN descriptors")
    ap.add_argument("--latency", type=float, required=True, help="one-way seconds")
    ap.add_argument("--jitter", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats", help="file to write the statistics to (JSON) at exit")
    a = ap.parse_args(argv)
    fw = Forwarder([int(x) for x in a.fds.split(",")], a.latency, a.jitter, a.loss, a.seed)

    def stop(*_: Any) -> None:
        fw.stop = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    t0 = time.monotonic()
    fw.run()
    if a.stats:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        st = dict(fw.stats, wall_s=time.monotonic() - t0, cpu_s=ru.ru_utime + ru.ru_stime)
        with open(a.stats, "w", encoding="utf-8") as f:
            json.dump(st, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
