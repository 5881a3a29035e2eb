"""The progress line of a long run: a bar on a terminal, a line per 10% otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress report on stderr (a bar on a terminal, a line per 10% else)."""

    def __init__(self, total: int, label: str, enabled: bool = True) -> None:
        self.total, self.label, self.enabled = max(total, 1), label, enabled
        self.tty = sys.stderr.isatty()
        self.last = -1
        self.t0 = time.perf_counter()

    def update(self, done: float, extra: str = "") -> None:
        if not self.enabled:
            return
        pct = int(100 * min(done / self.total, 1.0))
        if self.tty:
            if pct != self.last:
                bar = "#" * (pct // 4) + "." * (25 - pct // 4)
                el = time.perf_counter() - self.t0
                sys.stderr.write(f"\r{self.label} [{bar}] {pct:3d}% {el:6.1f}s {extra}   ")
                sys.stderr.flush()
        elif self.last < 0 or pct // 10 != self.last // 10:
            el = time.perf_counter() - self.t0
            sys.stderr.write(f"{self.label}: {pct}% ({el:.1f}s) {extra}\n")
        self.last = pct

    def finish(self, extra: str = "") -> None:
        """The 100% line of a completed run (the last evaluation may come before it)."""
        self.update(self.total, extra)

    def close(self) -> None:
        if self.enabled and self.tty and self.last >= 0:
            sys.stderr.write("\n")
