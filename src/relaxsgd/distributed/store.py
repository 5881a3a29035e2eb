"""Values in the rendezvous store, signed with the job secret.

torch's TCPStore (on ``MASTER_PORT``, hosted by rank 0 or by torchrun's agent) has no
authentication: whoever reaches it reads and overwrites every key. So every value
relaxsgd publishes there (the output folder, each worker's transport address, arrivals,
resume agreements, a start-up failure) is ``value | HMAC-SHA256(K, name | value)``, with K
derived from the job secret (:func:`.auth.store_key`); a value whose tag does not match
when read (forged, altered, moved to another key, or written with another secret) is
refused at once: :class:`StoreForged`, one line naming the key. Waits poll with a
deadline (``RELAXSGD_RENDEZVOUS_TIMEOUT``) and name what is missing. Where the store is
hosted and how a start-up failure reaches every worker: :mod:`.rendezvous`.

What stays open: gloo's (and NCCL's) own keys in the same store are not signed (torch
writes them), nor are the collectives' connections; a value replayed from an earlier job
that had the same secret passes the tag (the peer handshake still refuses a stranger);
anyone who reaches the store can delete keys or store huge values, which stops the job's
start (denial of service), but cannot make a worker use a forged value.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from ..errors import RelaxError
from .sockets import PeerLost

TAG = 32
POLL_S = 0.05


class StoreForged(RelaxError):
    """A value in the rendezvous store failed its job-secret tag (exit status 5)."""

    exit_code = 5


def sign(key: bytes, name: str, value: bytes) -> bytes:
    n = name.encode("utf-8")
    return value + hmac.digest(key, len(n).to_bytes(4, "big") + n + value, "sha256")


def verify(key: bytes, name: str, signed: bytes) -> bytes:
    """``signed``'s value if its tag is right, else :class:`StoreForged` naming ``name``."""
    value = signed[:-TAG]
    if len(signed) < TAG or not hmac.compare_digest(sign(key, name, value), signed):
        raise StoreForged(f"the rendezvous store's value under {name!r} is not signed with "
                          "this job's secret (forged or altered by someone who reached "
                          "MASTER_PORT, or written by a worker with another secret); "
                          "refusing it")
    return value


def _lost(e: BaseException, where: str) -> PeerLost:
    return PeerLost(f"lost the rendezvous store at {where} ({type(e).__name__}): worker 0 "
                    "(or torchrun's agent), which hosts it, stopped or was killed")


class SignedStore:
    """Keys under ``prefix`` of the raw store, every value signed (see the module doc).
    Waits poll, so a wait never holds the store connection for long."""

    def __init__(self, raw: Any, key: bytes, prefix: str, timeout_s: float,
                 where: str) -> None:
        self.raw, self.key, self.prefix = raw, key, prefix
        self.timeout, self.where = timeout_s, where

    def name(self, k: str) -> str:
        return f"{self.prefix}/{k}"  # (as torch's PrefixStore spells it)

    def _op(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (RuntimeError, OSError) as e:  # torch's DistError is a RuntimeError
            raise _lost(e, self.where) from None

    def set(self, k: str, value: str | bytes) -> None:
        v = value.encode("utf-8") if isinstance(value, str) else value
        self._op(self.raw.set, self.name(k), sign(self.key, self.name(k), v))

    def claim(self, k: str, value: str) -> bytes | None:
        """Set ``k`` unless it is there already; None, or the (verified) value there."""
        name = self.name(k)
        mine = sign(self.key, name, value.encode("utf-8"))
        got = self._op(self.raw.compare_set, name, "", mine)
        return None if got == mine else verify(self.key, name, got)

    def check(self, ks: list[str]) -> bool:
        return bool(self._op(self.raw.check, [self.name(k) for k in ks]))

    def wait(self, ks: list[str], timeout: float | None = None) -> None:
        """Until every key of ``ks`` is there; PeerLost naming the missing ones after
        ``timeout`` (default: the rendezvous timeout)."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        missing = list(ks)
        while missing:
            missing = [k for k in missing if not self.check([k])]
            if missing and time.monotonic() > end:
                raise PeerLost(f"nothing under {', '.join(map(repr, missing[:4]))} in the "
                               f"rendezvous store within {self.timeout:g}s "
                               "(RELAXSGD_RENDEZVOUS_TIMEOUT): the worker that writes it "
                               "did not get that far")
            if missing:
                time.sleep(POLL_S)

    def get(self, k: str, timeout: float | None = None) -> bytes:
        self.wait([k], timeout)
        return verify(self.key, self.name(k), self._op(self.raw.get, self.name(k)))
