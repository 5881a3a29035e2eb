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

Elastic jobs: ``--restarts K`` (K > 0) restarts a worker that dies (a non-zero status other
than 2, or a signal) up to K times per worker, with the same ``RANK`` and
``RELAXSGD_INCARNATION`` (and ``RELAXSGD_RESTART``) one higher; past K it says so in one
line and the job goes on without that worker. Such a job is elastic (``RELAXSGD_ELASTIC=1``,
ELASTIC.md): the launcher itself hosts the rendezvous store
(``TORCHELASTIC_USE_AGENT_STORE=True``, as torchrun's agent does), so the death of rank 0
does not take the store with it, and it records each death in the job's member registry
(:mod:`.membership`) at once, so every worker learns of it even without a connection to
the dead one. A worker started by hand joins with ``relaxsgd join`` (:mod:`.join`).

Across machines, use torchrun (``--nnodes``, ``--rdzv-endpoint``): see docs/distributed.md.
"""

from __future__ import annotations

import argparse
import datetime
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
MAX_RESTARTS = 1000
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
    """``n`` processes of ``cmd`` on this machine; see the module docstring.
    ``restarts`` > 0: an elastic job (the launcher hosts the store; :meth:`restart`)."""

    def __init__(self, cmd: Sequence[str], n: int, port: int | None = None,
                 env: dict[str, str] | None = None,
                 rank_env: dict[int, dict[str, str]] | None = None,
                 log_dir: str | None = None, restarts: int = 0) -> None:
        self.n, self.port = n, port or free_port()
        self.cmd, self.log_dir, self.restarts = list(cmd), log_dir, restarts
        self.procs: list[subprocess.Popen] = []
        base = {**os.environ, **(env or {})}
        job_secret = job_secret_env(base)
        self.store: object | None = None
        elastic: dict[str, str] = {}
        if restarts > 0:
            self.store, self.key = host_store(self.port), store_key_of({**base, **job_secret})
            elastic = {"RELAXSGD_ELASTIC": "1", "TORCHELASTIC_USE_AGENT_STORE": "True",
                       "RELAXSGD_INCARNATION": "0", "RELAXSGD_RESTART": "0",
                       "RELAXSGD_MAX_RESTARTS": str(restarts)}
        self.logs: list[str | None] = []
        self.envs: list[dict[str, str]] = []
        self.incarnations = [0] * n
        for r in range(n):
            e = {**base, **job_secret, **(rank_env or {}).get(r, {}), **elastic}
            e.update(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                     LOCAL_WORLD_SIZE=str(n), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(self.port))
            e.setdefault("OMP_NUM_THREADS", "1")
            self.envs.append(e)
            try:
                self.procs.append(self._spawn(r))
            except LaunchError:
                stop_groups(self.procs, 1.0)
                raise

    def _spawn(self, r: int) -> subprocess.Popen:
        """Start worker ``r`` (its log appended to, on a restart)."""
        out = path = None
        if self.log_dir is not None:
            os.makedirs(self.log_dir, exist_ok=True)
            path = os.path.join(self.log_dir, f"rank{r}.log")
            out = open(path, "a" if self.incarnations[r] else "w")  # noqa: SIM115
        if r == len(self.logs):
            self.logs.append(path)
        try:
            return subprocess.Popen(self.cmd, env=self.envs[r], stdout=out,
                                    stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True)
        except OSError as err:  # no such program, not executable, a folder...
            what = "no such program" if isinstance(err, FileNotFoundError) else \
                err.strerror or str(err)
            raise LaunchError(f"cannot start {self.cmd[0]!r}: {what}; give a command that "
                              "runs here, e.g. relaxsgd run --runtime dist ...") from None
        finally:
            if out is not None:
                out.close()  # (the child has its own copy)

    def restart(self, r: int, code: int) -> None:
        """Record worker ``r``'s death in the member registry, start it again with the
        next incarnation."""
        from .membership import Registry

        if self.store is not None:
            try:
                Registry(self.store, self.key).leave(
                    r, self.incarnations[r], f"its process ended with status {code} "
                    "(the launcher restarts it)" if code >= 0 else
                    f"its process was killed by signal {-code} (the launcher restarts it)")
            except Exception:  # noqa: BLE001 - the record is a courtesy; the restart is not
                pass
        self.incarnations[r] += 1
        inc = str(self.incarnations[r])
        self.envs[r].update(RELAXSGD_INCARNATION=inc, RELAXSGD_RESTART=inc)
        self.procs[r] = self._spawn(r)

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


def host_store(port: int) -> object:
    """The job's rendezvous store, hosted by this process on 127.0.0.1:``port``."""
    import torch.distributed as dist

    try:
        return dist.TCPStore("127.0.0.1", port, None, True, datetime.timedelta(seconds=60),
                             wait_for_workers=False)
    except (RuntimeError, OSError) as e:
        raise LaunchError(f"cannot host the rendezvous store on 127.0.0.1:{port} "
                          f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
                          "); choose another --port") from None


def store_key_of(env: dict[str, str]) -> bytes:
    """The store key of the job secret in ``env`` (what the workers sign with)."""
    from . import auth as A

    if env.get("RELAXSGD_SECRET"):
        key = env["RELAXSGD_SECRET"].encode("utf-8")
    elif env.get("RELAXSGD_SECRET_FILE"):
        try:
            key = A._read_secret_file(env["RELAXSGD_SECRET_FILE"])
        except Exception as e:  # noqa: BLE001 - (ConfigError) the workers say it too
            raise LaunchError(str(e)) from None
    else:
        key = A.INSECURE_KEY
    return A.store_key(A.Auth(key))


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
    ap.add_argument("--restarts", type=_bounded(int, 0, MAX_RESTARTS, "--restarts"),
                    default=0, help="restart a worker that dies up to K times (an elastic "
                    "job: the launcher hosts the store; the worker rejoins)")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, e.g. relaxsgd run ...")
    a = ap.parse_args(argv)
    a.cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not a.cmd:
        ap.error("give -n N and a command")
    return a


def _restart_dead(job: LocalJob, given_up: set[int]) -> None:
    """Restart each worker that died (not status 0, nor 2: bad input fails again) while
    another still runs, up to ``job.restarts`` times; past that one line, and the job
    goes on without it."""
    codes = job.poll()
    for r, c in enumerate(codes):
        if c is None or c in (0, 2) or r in given_up:
            continue
        how = f"status {c}" if c > 0 else f"signal {-c}"
        others = any(x is None for k, x in enumerate(codes) if k != r)
        if job.incarnations[r] < job.restarts and others:
            sys.stderr.write(f"{PROG}: worker {r} ended ({how}); restarting it (restart "
                             f"{job.incarnations[r] + 1} of {job.restarts})\n")
            job.restart(r, c)
            continue
        given_up.add(r)
        why = (f"it was restarted {job.restarts} times (--restarts {job.restarts}); the "
               "job goes on without it" if others else "no other worker is running")
        sys.stderr.write(f"{PROG}: worker {r} ended ({how}); not restarting it: {why}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    a = _arguments(argv)
    try:
        job = LocalJob(a.cmd, a.nproc, a.port, restarts=a.restarts)
    except LaunchError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    stopping = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    refused_at = None
    given_up: set[int] = set()
    while any(c is None for c in job.poll()):
        if stopping:
            job.stop(a.grace)
            break
        if job.restarts:
            _restart_dead(job, given_up)
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
