"""A minimal single-machine launcher: ``python -m relaxsgd.distributed.launch -n 4 CMD``.

It starts the command ``n`` times with torchrun's environment contract (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, a free
``MASTER_PORT``; rank 0 hosts the rendezvous store) and one torch thread per process
(``OMP_NUM_THREADS=1``), and a fresh job secret (``RELAXSGD_SECRET``, 64 random hex
digits, in the workers' environment only: see :mod:`.auth`) unless one is set already
(``RELAXSGD_SECRET``, ``RELAXSGD_SECRET_FILE`` or ``RELAXSGD_INSECURE``). Unlike
torchrun's agent, it does NOT stop the others when one worker dies: that is what lets an
asynchronous algorithm (SwarmSGD) carry on among the survivors; a synchronous one fails by
itself on every worker, naming the lost one. A worker that exits with status 2 (bad
input: it refused the run, which the others cannot run either) does stop the job: the
others learn it through the rendezvous store and stop by themselves within a second
(:mod:`.rendezvous`); whoever is left :data:`BAD_INPUT_GRACE_S` later is stopped by the
launcher, with one line naming the worker. Ctrl-C or SIGTERM to the launcher is passed
on to every worker as SIGTERM (they write what they have and stop); whoever is still
there after ``--grace`` seconds is killed. The exit
status is the first non-zero status of a worker (by rank), else 0.

Across machines, use torchrun (``--nnodes``, ``--rdzv-endpoint``): see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

SECRET_VARS = ("RELAXSGD_SECRET", "RELAXSGD_SECRET_FILE", "RELAXSGD_INSECURE")
MAX_PROCS = 1024  # (environment.MAX_WORLD)
BAD_INPUT_GRACE_S = 3.0
PROG = "relaxsgd.distributed.launch"


class LaunchError(Exception):
    """The command cannot be started (one line)."""


def job_secret_env(base: dict[str, str]) -> dict[str, str]:
    """A fresh job secret for the workers' environment, unless ``base`` names one (or
    opts out): what a launcher of a single-machine or lab job hands its workers."""
    if any(base.get(k) for k in SECRET_VARS):
        return {}
    return {"RELAXSGD_SECRET": secrets.token_hex(32)}


def signal_groups(procs: Sequence[subprocess.Popen], sig: int) -> None:
    """Send ``sig`` to the process group of every process still running (each was
    started with ``start_new_session=True``, so its children get it too)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass


def stop_groups(procs: Sequence[subprocess.Popen], grace: float) -> None:
    """SIGTERM every running process group, SIGKILL what is left after ``grace`` seconds,
    and reap them all."""
    signal_groups(procs, signal.SIGTERM)
    end = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < end:
        time.sleep(0.02)
    signal_groups(procs, signal.SIGKILL)
    for p in procs:
        # With a timeout, Popen.wait never blocks on its internal lock: a timeout signal
        # (pytest-timeout's, a user's Ctrl-C) that interrupted an earlier wait can leave that
        # lock held, and a plain wait() would then hang forever in this clean-up.
        p.wait(timeout=max(grace, 5.0))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalJob:
    """``n`` processes of ``cmd`` on this machine; see the module docstring."""

    def __init__(self, cmd: Sequence[str], n: int, port: int | None = None,
                 env: dict[str, str] | None = None,
                 rank_env: dict[int, dict[str, str]] | None = None,
                 log_dir: str | None = None) -> None:
        self.n, self.port = n, port or free_port()
        self.procs: list[subprocess.Popen] = []
        base = {**os.environ, **(env or {})}
        job_secret = job_secret_env(base)
        self.logs: list[str | None] = []
        for r in range(n):
            e = {**base, **job_secret, **(rank_env or {}).get(r, {})}
            e.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                     LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(self.port))
            e.setdefault("OMP_NUM_THREADS", "1")
            out = None
            path = None
            if log_dir is not None:
                os.makedirs(log_dir, exist_ok=True)
                path = os.path.join(log_dir, f"rank{r}.log")
                out = open(path, "w")  # noqa: SIM115 - closed when the process ends
            try:
                self.procs.append(subprocess.Popen(list(cmd), env=e, stdout=out,
                                                   stderr=subprocess.STDOUT if out else None,
                                                   start_new_session=True))
            except OSError as err:  # no such program, not executable, a folder...
                stop_groups(self.procs, 1.0)
                what = "no such program" if isinstance(err, FileNotFoundError) else \
                    err.strerror or str(err)
                raise LaunchError(f"cannot start {cmd[0]!r}: {what}; give a command that "
                                  "runs here, e.g. relaxsgd run --runtime dist ...") from None
            finally:
                if out is not None:
                    out.close()  # (the child has its own copy)
            self.logs.append(path)

    def poll(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def signal(self, sig: int, ranks: Sequence[int] | None = None) -> None:
        signal_groups([self.procs[r] for r in (ranks if ranks is not None
                                               else range(self.n))], sig)

    def wait(self, timeout: float | None = None, grace: float = 10.0) -> list[int]:
        """Wait for every worker; past ``timeout`` SIGTERM them, past ``grace`` more
        SIGKILL them. Returns their exit statuses (negative: killed by that signal)."""
        end = None if timeout is None else time.monotonic() + timeout
        while any(c is None for c in self.poll()):
            if end is not None and time.monotonic() > end:
                self.stop(grace)
                break
            time.sleep(0.05)
        return [p.wait() for p in self.procs]

    def stop(self, grace: float = 10.0) -> None:
        stop_groups(self.procs, grace)

    def output(self, rank: int) -> str:
        path = self.logs[rank]
        if path is None:
            return ""
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()


def _bounded(kind: type, lo: float, hi: float, what: str) -> object:
    """An argparse type: a number of ``kind`` in lo..hi (one line otherwise)."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:  # (also NaN)
            raise argparse.ArgumentTypeError(f"{what} must be in {lo:g}..{hi:g}, got "
                                             f"{text[:40]!r}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error (as relaxsgd's)
        sys.stderr.write(f"{PROG}: error: {message} (see 'python -m {PROG} --help')\n")
        raise SystemExit(2)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    ap = _Parser(prog=f"python -m {PROG}",
                                 description="start a command as n workers on this machine")
    ap.add_argument("-n", "--nproc", required=True, help="number of workers",
                    type=_bounded(int, 1, MAX_PROCS, "-n (workers)"))
    ap.add_argument("--port", help="rendezvous port (default: a free one)",
                    type=_bounded(int, 1, 65535, "--port"))
    ap.add_argument("--grace", type=_bounded(float, 0, 3600, "--grace (seconds)"),
                    default=10.0, help="seconds between SIGTERM and SIGKILL when stopping")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, e.g. relaxsgd run ...")
    a = ap.parse_args(argv)
    a.cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not a.cmd:
        ap.error("give -n N and a command")
    return a


def main(argv: list[str] | None = None) -> int:
    a = _arguments(argv)
    try:
        job = LocalJob(a.cmd, a.nproc, a.port)
    except LaunchError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    stopping = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    refused_at = None
    while any(c is None for c in job.poll()):
        if stopping:
            job.stop(a.grace)
            break
        codes = job.poll()
        if refused_at is None and 2 in codes:
            refused_at = time.monotonic()
        elif refused_at is not None and time.monotonic() - refused_at > BAD_INPUT_GRACE_S:
            sys.stderr.write(f"{PROG}: worker {codes.index(2)} refused the run (status 2); "
                             "stopping the others\n")
            job.stop(a.grace)
            break
        time.sleep(0.05)
    codes = [p.wait() for p in job.procs]
    bad = [c for c in codes if c != 0]
    if bad:
        sys.stderr.write(f"{PROG}: exit statuses by rank: {codes}\n")
    return (bad[0] if bad[0] > 0 else 128 - bad[0]) if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
