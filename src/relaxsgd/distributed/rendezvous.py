"""Meeting the job's other workers at start-up, through the rendezvous store.

- Rank 0 hosts the store on the address of ``MASTER_ADDR`` only (a socket bound here and
  handed to torch's TCPStore as ``master_listen_fd``), not on every interface; only where
  that address is not one of this machine's (a NAT) does it listen on all, with a warning
  line. The others connect once something listens there (quietly: torch's client logs
  each failed try with a C++ stack).
- Every worker joins the store first, before the slow part of its start-up, and claims
  its rank there (:meth:`Rendezvous.meet`: a second process with the same ``RANK`` or a
  different ``WORLD_SIZE`` is one line); the values are signed (:mod:`.store`).
- A worker that fails before the run has started publishes its failure (signed) under
  :data:`ABORT`; every worker watches that key while it starts, on a second connection
  (a thread: the main one may be blocked inside gloo's own rendezvous), and stops within
  a fraction of a second with one line naming the failed worker and its reason (exit
  status 2 if that was bad input, else 5). Rank 0, when it hosts the store, waits for the
  others to have seen it (at most :data:`LINGER_S`) before it leaves. After the start
  barrier, faults are the transport's business.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import itertools
import json
import os
import secrets
import select
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError, RelaxError
from .environment import JobEnv
from .sockets import PeerLost
from .store import POLL_S, TAG, SignedStore, StoreForged, _lost, sign, verify

ABORT = "relaxsgd/abort"
SEEN = "relaxsgd/abort-seen"
WATCH_S = 0.1
LINGER_S = 10.0
CONNECT_S = 10.0  # to a store that already accepts connections


def _bind(job: JobEnv) -> tuple[socket.socket, str]:
    """Rank 0's listening socket for the store, on MASTER_ADDR's address; and the address
    its own client connects to."""
    ip = job.master_ip
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        try:
            sock.bind((ip, job.master_port))
        except OSError as e:
            if e.errno != errno.EADDRNOTAVAIL:
                raise
            sys.stderr.write(f"relaxsgd: warning: MASTER_ADDR {job.master_addr} ({ip}) is not "
                             "an address of this machine (a NAT?); the rendezvous store "
                             "listens on every interface\n")
            sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", job.master_port))
            ip = "::1" if fam == socket.AF_INET6 else "127.0.0.1"
        sock.listen(1024)
    except OSError as e:
        sock.close()
        port = job.master_port
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"MASTER_PORT {port} is already in use on this machine "
                              "(another job, or one still ending?); choose another port, or "
                              "let python -m relaxsgd.distributed.launch pick a free one") \
                from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"MASTER_PORT {port} needs privileges here ({e.strerror}); "
                              "choose a port in 1024..65535") from None
        raise ConfigError(f"cannot listen on MASTER_ADDR:MASTER_PORT {ip}:{port} "
                          f"({e.strerror or e})") from None
    return sock, ip


def _await_listening(ip: str, port: int, timeout_s: float) -> None:
    """Until something accepts connections at ip:port (quietly: torch's client logs every
    failed try), or PeerLost after ``timeout_s``."""
    end = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((ip, port), timeout=min(2.0, timeout_s)):
                return
        except OSError:
            if time.monotonic() > end:
                raise PeerLost(f"no rendezvous store answers at MASTER_ADDR:MASTER_PORT "
                               f"{ip}:{port} within {timeout_s:g}s "
                               "(RELAXSGD_RENDEZVOUS_TIMEOUT): worker 0, which hosts it, "
                               "did not start or stopped, or that is not its address") \
                    from None
            time.sleep(0.1)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 into a scratch file for the duration: torch's client logs each
    failed try with a C++ stack of 30 lines, where one line of ours says it all."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _client(ip: str, port: int, timeout_s: float, quiet: bool = True) -> Any:
    """A client of the store at ip:port. ``quiet``: torch's logs of a failed connection
    are dropped (only while no other thread of ours may write to stderr: the first)."""
    import torch.distributed as dist

    _await_listening(ip, port, timeout_s)
    try:
        # (something accepts: only a stranger makes torch talk)
        with _quiet_stderr() if quiet else contextlib.nullcontext():
            raw = dist.TCPStore(ip, port, None, False,
                                datetime.timedelta(seconds=CONNECT_S))
    except (RuntimeError, OSError) as e:
        raise PeerLost(f"MASTER_ADDR:MASTER_PORT {ip}:{port} accepts connections but is "
                       f"not a rendezvous store ({type(e).__name__}); give rank 0's "
                       "address and port") from None
    raw.set_timeout(datetime.timedelta(seconds=timeout_s))
    return raw


class Rendezvous:
    """This process's connection to its job's store (one for the process's life: the
    runs of ``relaxsgd compare --runtime dist`` each get a prefix), the start-up watcher
    and the failure announcement. See the module docstring."""

    def __init__(self, job: JobEnv, key: bytes, timeout_s: float,
                 connect_s: float | None = None) -> None:
        import torch.distributed as dist

        self.job, self.key, self.timeout = job, key, timeout_s
        self.host = job.rank == 0 and not job.agent_store
        self.failed = False
        self._runs = itertools.count()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if self.host:
            sock, self.ip = _bind(job)
            self.port = sock.getsockname()[1]
            self.raw = dist.TCPStore(self.ip, self.port, None, True,
                                     datetime.timedelta(seconds=timeout_s),
                                     wait_for_workers=False, master_listen_fd=sock.detach())
        else:
            self.ip, self.port = job.master_ip, job.master_port
            self.raw = _client(self.ip, self.port, connect_s or timeout_s)
        self.where = f"{job.master_addr}:{self.port}"

    def run_store(self) -> tuple[SignedStore, Any]:
        """The next run's signed view, and the raw prefixed store for torch's groups."""
        import torch.distributed as dist

        prefix = f"relaxsgd/run{next(self._runs)}/"
        return (SignedStore(self.raw, self.key, prefix, self.timeout, self.where),
                dist.PrefixStore(prefix, self.raw))

    # -- arrivals ----------------------------------------------------------------------
    def meet(self, store: SignedStore) -> None:
        """Every worker of the run has arrived (same WORLD_SIZE, one process per rank),
        or one line naming who did not within the rendezvous timeout."""
        job, nonce = self.job, secrets.token_hex(8)
        me = {"world": job.world, "nonce": nonce, "pid": os.getpid(),
              "host": socket.gethostname()[:100]}
        taken = store.claim(f"arrived/{job.rank}", json.dumps(me))
        if taken is not None:
            other = json.loads(taken)
            raise ConfigError(f"another process ({other['host']}, pid {other['pid']}) "
                              f"already runs as RANK={job.rank} of this job: give every "
                              "worker its own RANK")
        end = time.monotonic() + self.timeout
        waiting = set(range(job.world))
        while waiting:
            for r in sorted(waiting):
                if store.check([f"arrived/{r}"]):
                    got = json.loads(store.get(f"arrived/{r}"))
                    if got["world"] != job.world:
                        raise ConfigError(f"worker {r} has WORLD_SIZE={got['world']} and "
                                          f"worker {job.rank} {job.world}: give every "
                                          "worker the same WORLD_SIZE")
                    waiting.discard(r)
            if waiting and time.monotonic() > end:
                raise PeerLost(f"worker(s) {sorted(waiting)} did not reach the rendezvous "
                               f"at {self.where} within {self.timeout:g}s "
                               "(RELAXSGD_RENDEZVOUS_TIMEOUT): not started, stopped, or "
                               "meeting at another MASTER_ADDR:MASTER_PORT")
            if waiting:
                time.sleep(POLL_S)

    # -- start-up failures -------------------------------------------------------------
    def watch(self) -> None:
        """Watch for another worker's start-up failure until :meth:`started`."""
        if self._watcher is None or not self._watcher.is_alive():
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch, daemon=True,
                                             name="relax-startup-watch")
            self._watcher.start()

    def started(self) -> None:
        """The run has started: faults are the transport's business from now on."""
        self._stop.set()

    def _watch(self) -> None:
        try:
            raw = _client(self.ip, self.port, CONNECT_S, quiet=False)  # (a known store)
            # a silent connection of our own: its end of stream says the host is gone,
            # before a store operation fails (and torch logs 30 lines about it)
            alive = socket.create_connection((self.ip, self.port), timeout=CONNECT_S)
        except (RelaxError, OSError):
            return
        with alive:
            while not self._stop.is_set():
                try:
                    if select.select([alive], [], [], WATCH_S)[0] and not alive.recv(1):
                        raise ConnectionResetError("the store closed our connection")
                    if self._stop.is_set() or not raw.check([ABORT]):
                        continue
                    value = raw.get(ABORT)
                except (RuntimeError, OSError) as e:
                    if not self._stop.is_set() and not self.failed:
                        self._leave(str(_lost(e, self.where)), 5, None)
                    return
                if self.failed or self._stop.is_set():
                    return
                rank, code, line = self._read_abort(value)
                if rank != self.job.rank:
                    self._leave(line, code, raw)
                    return

    def _read_abort(self, value: bytes) -> tuple[int, int, str]:
        try:
            d = json.loads(verify(self.key, ABORT, value))
            return int(d["rank"]), 2 if d["status"] == 2 else 5, \
                f"worker {int(d['rank'])} stopped at start-up: {d['message']}"
        except StoreForged:
            return -1, 5, (f"the rendezvous store holds a stop request under {ABORT!r} "
                           "that is not signed with this job's secret (from a worker with "
                           "a missing or different secret, or forged; "
                           f"{_claim(value[:-TAG])}); stopping")
        except (ValueError, KeyError, TypeError):
            return -1, 5, f"the rendezvous store's value under {ABORT!r} is malformed; stopping"

    def _leave(self, line: str, code: int, raw: Any | None) -> None:
        """Another worker failed at start-up: say so, let it know, leave now."""
        sys.stderr.write(f"relaxsgd: error: {line}\n")
        sys.stderr.flush()
        try:
            if raw is None:  # (the store is gone)
                pass
            elif not self.host:
                raw.add(SEEN, 1)
            else:
                self._linger(raw)
        except (RuntimeError, OSError):
            pass
        sys.stdout.flush()
        from ..runlock import release_all

        release_all()  # os._exit skips the run's context managers
        os._exit(code)

    def _linger(self, raw: Any) -> None:
        """The host waits (at most LINGER_S) until every other worker saw the failure."""
        start = time.monotonic()
        # (at least a few watch periods: a process that is not counted, a second one
        # claiming a rank, say, still sees why before the store goes)
        while time.monotonic() - start < LINGER_S and (
                time.monotonic() - start < 5 * WATCH_S or raw.add(SEEN, 0) < self.job.world - 1):
            time.sleep(POLL_S)

    def fail(self, message: str, code: int, signed: bool = True,
             linger: bool = True) -> None:
        """Publish this worker's start-up failure (the first one wins) for the others;
        the host then waits for them to have seen it (unless not ``linger``)."""
        self.failed = True
        value = json.dumps({"rank": self.job.rank, "status": code,
                            "message": message[:1000]}).encode()
        value = sign(self.key, ABORT, value) if signed else value + bytes(TAG)
        try:
            self.raw.compare_set(ABORT, "", value)
            if self.host and linger:
                self._linger(self.raw)
            else:
                self.raw.add(SEEN, 1)
        except (RuntimeError, OSError):
            pass


def _claim(text: bytes) -> str:
    """What an unauthenticated stop request says, shown as a claim: printable, short."""
    try:
        d = json.loads(text)
        said = f"it claims to be worker {int(d['rank'])}: {str(d['message'])[:160]}"
    except (ValueError, KeyError, TypeError):
        said = f"it says {text[:80]!r}"
    return "".join(c if c.isprintable() else "?" for c in said)


_RDV: Rendezvous | None = None
_ANNOUNCED: list[bool] = []
_TRIED: list[bool] = []


def rendezvous(job: JobEnv, key: bytes, timeout_s: float) -> Rendezvous:
    """This process's :class:`Rendezvous` (made on first use), watching start-up."""
    global _RDV
    if _RDV is None:
        _TRIED.append(True)  # (if this fails, announce does not try again)
        _RDV = Rendezvous(job, key, timeout_s)
    _RDV.watch()
    return _RDV


def started() -> None:
    if _RDV is not None:
        _RDV.started()


def announce(e: BaseException) -> None:
    """Tell the job's other workers that this one fails at start-up (best effort, once):
    through the store if it is reachable within a few seconds; never raises."""
    if _ANNOUNCED:
        return
    _ANNOUNCED.append(True)
    code = e.exit_code if isinstance(e, RelaxError) else 5
    message = str(e) if isinstance(e, RelaxError) else "interrupted (Ctrl-C or SIGTERM)" \
        if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
    rdv = _RDV
    try:
        if rdv is None:
            if _TRIED:  # the store itself is what could not be reached
                return
            rdv = _reach()
            if rdv is None:
                return
            rdv.fail(message, code, signed=rdv.key != b"")
        elif not rdv._stop.is_set():  # (after the start, the transport tells them)
            # (a signal usually reaches every worker: no waiting for them then)
            rdv.fail(message, code, linger=not isinstance(e, KeyboardInterrupt))
    except Exception:  # noqa: BLE001 - a courtesy to the others: this worker is failing
        pass


def _reach() -> Rendezvous | None:
    """A connection to the store for :func:`announce` when none was made yet."""
    from . import auth as A
    from .environment import read_job_env
    from .options import DistOptions, from_env

    try:
        job = read_job_env()
    except ConfigError:
        return None  # nothing sensible to reach
    if job.world == 1:
        return None
    try:
        opts = from_env()
    except ConfigError:  # (what failed, maybe): only the secret matters here
        opts = DistOptions()
    try:
        key = A.store_key(A.job_auth(opts))
    except ConfigError:
        key = b""  # published unsigned: the others stop, saying it is not signed
    try:
        return Rendezvous(job, key, LINGER_S, connect_s=LINGER_S)
    except (RelaxError, RuntimeError, OSError):
        return None
