"""One writer per run folder: an advisory lock held for a run's life.

Two processes writing one run folder (two ``relaxsgd resume`` of the same run, a ``run
--force`` into a folder in use) interleave ``metrics.csv`` rows and replace each other's
``result.json`` and checkpoints, and both exit 0. So a run holds ``fcntl.flock`` on
``<folder>/.relaxsgd.lock`` from before it writes anything until its last file is
written (:func:`run.run` takes it: ``run``, ``resume``, each run of ``compare``; in the
distributed runtime rank 0, the writer, holds it; the other ranks never touch it, and the
lock is never waited for, so ranks on one host cannot deadlock on it). The file holds the
owner's pid, host and start time, and a second writer is refused with one line naming
them.

The kernel drops a flock when its process dies, however it dies, so a lock file left
behind by a killed run is not held: the next run takes it over, with a note naming the
dead owner. A clean exit removes the file (while still holding the lock; a process that
opened the old file re-checks that its lock is on the file at the path, see
:meth:`RunLock.acquire`). Advisory only: it stops relaxsgd processes, not other programs,
and on file systems without flock (some NFS setups) it may not hold across machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

from .errors import ConfigError

LOCK_NAME = ".relaxsgd.lock"
_MAX_OWNER_BYTES = 4096
_HELD: dict[str, int] = {}  # folders this process holds -> nesting depth
_OWNED: dict[str, RunLock] = {}  # folder -> the outermost lock object holding it


def _owner_text(raw: bytes) -> str:
    """'pid P on host H (since T)' from the lock file's bytes, or a plain description."""
    try:
        o = json.loads(raw.decode("utf-8"))
        pid, host, since = int(o["pid"]), str(o["host"])[:64], str(o.get("since", ""))[:32]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, AttributeError):
        return "another process (its lock file names no owner)"
    host = "".join(c for c in host if c.isprintable())
    return f"pid {pid} on host {host!r}" + (f" (since {since})" if since else "")


class RunLock:
    """The lock of run folder ``folder`` (which must exist); use as a context manager."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or ConfigError naming the process that holds it. Re-entrant
        within a process (``resume`` takes it before reading the run's status, then
        :func:`run.run` again)."""
        import fcntl

        key = os.path.realpath(self.folder)
        if key in _HELD:
            _HELD[key] += 1
            self.fd = -1
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ConfigError(f"cannot lock the run folder {self.folder!r}: "
                                  f"{e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held by a live process
                owner = _owner_text(os.pread(fd, _MAX_OWNER_BYTES, 0))
                os.close(fd)
                raise ConfigError(f"the run folder {self.folder!r} is in use by {owner}; "
                                  "wait for that run to end or stop it (two writers would "
                                  "mix their files), or give another --out") from None
            try:  # the owner may have removed the file between our open and our flock
                st, fst = os.stat(self.path), os.fstat(fd)
                same = (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        _HELD[key] = 1
        _OWNED[key] = self
        left = os.pread(fd, _MAX_OWNER_BYTES, 0)
        if left.strip():
            import sys

            sys.stderr.write(f"relaxsgd: note: taking over the lock of {self.folder!r} left "
                             f"by {_owner_text(left)}, which is no longer running\n")
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._me(), 0)
        return self

    @staticmethod
    def _me() -> bytes:
        return (json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n").encode()

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        key = os.path.realpath(self.folder)
        _HELD[key] = _HELD.get(key, 1) - 1
        if self.fd == -1 or _HELD[key] > 0:  # an inner hold of this process's lock
            self.fd = None
            return
        del _HELD[key]
        _OWNED.pop(key, None)
        with contextlib.suppress(OSError):
            st, fst = os.stat(self.path), os.fstat(self.fd)
            if (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev):
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def release_all() -> None:
    """Release every run lock this process holds, however nested: for an exit that skips
    the context managers (the dist runtime's ``os._exit`` after a fault), so that the lock
    file does not stay behind in a folder that a rerun must find empty."""
    for key, lock in list(_OWNED.items()):
        _HELD[key] = 1
        lock.release()


def ensure_free(folder: str) -> None:
    """ConfigError if a live process holds ``folder``'s lock (checked before ``--force``
    cleans a folder: a run in progress there must not lose its files)."""
    if os.path.exists(os.path.join(folder, LOCK_NAME)):
        RunLock(folder).acquire().release()  # a stale lock file is removed on the way
