"""Who is in an elastic job: the member registry in the rendezvous store.

An elastic job (ELASTIC.md: ``launch --restarts K``, ``elastic.max_workers > workers``,
``relaxsgd join``) has workers that leave, come back and join. Its store holds, signed
with the job secret (:mod:`.store`; the launcher hosts it, so rank 0's death does not
take it):

- ``relaxsgd/members/<id>``: ``{"inc": k, "addr": "host:port"}``, written by worker
  ``id`` when it starts its transport (incarnation ``k``: 0 at the job's start, then
  one more per restart: ``RELAXSGD_INCARNATION``);
- ``relaxsgd/left/<id>``: ``{"inc": k, "why": ...}``, written by whoever knows first that
  incarnation ``k`` of ``id`` is gone: the launcher (the process exited), a worker whose
  connection to it closed or that it did not answer within the peer timeout, or the
  worker itself on a clean leave;
- ``relaxsgd/members-epoch``: a counter, one more per change (a hint, so it is not
  signed: a forged bump costs one re-read of the signed records, nothing else);
- ``relaxsgd/next-id``: the joiners' counter (:func:`claim_id`).

Every worker's transport polls the epoch (:data:`POLL_S`) and, when it moved, re-reads
the records: that is how a change reaches every live worker, including those that hold
no connection to the worker concerned (connections are opened on demand; see
:mod:`.transport`). Within ``POLL_S`` of the record, plus at once for the peers with an
open connection to a killed worker (end of stream).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from ..errors import ConfigError
from .store import SignedStore, StoreForged

ROOT = "relaxsgd"
EPOCH = "members-epoch"
NEXT_ID = "next-id"
POLL_S = 0.1
CLEAN_LEAVE = "it finished (a clean leave)"  # a worker's own record when it closes


class JoinRefused(ConfigError):
    """A joiner that the job cannot take (it is full): one line, exit status 2."""


class Registry:
    """The member records of one job (see the module docstring), on the raw store ``raw``
    with the store key of the job secret."""

    def __init__(self, raw: Any, key: bytes, timeout_s: float = 30.0,
                 where: str = "the rendezvous store", root: str = ROOT) -> None:
        self.raw = raw  # (root: ROOT for an elastic job, where the launcher writes too;
        self.signed = SignedStore(raw, key, root, timeout_s, where)  # else the run's)

    def _bump(self) -> None:
        self.signed._op(self.raw.add, self.signed.name(EPOCH), 1)

    def epoch(self) -> int:
        return int(self.signed._op(self.raw.add, self.signed.name(EPOCH), 0))

    def register(self, wid: int, inc: int, addr: str) -> None:
        self.signed.set(f"members/{wid}", json.dumps({"inc": inc, "addr": addr}))
        self._bump()

    def leave(self, wid: int, inc: int, why: str) -> None:
        """Record that incarnation ``inc`` of ``wid`` is gone (kept if a later one's is
        there already: an old leave never hides a newer incarnation)."""
        old = self.left(wid)
        if old is not None and old[0] > inc:
            return
        self.signed.set(f"left/{wid}", json.dumps({"inc": inc, "why": why[:500]}))
        self._bump()

    def _read(self, k: str) -> dict | None:
        if not self.signed.check([k]):
            return None
        try:
            d = json.loads(self.signed.get(k, timeout=5.0))
            return d if isinstance(d, dict) and isinstance(d.get("inc"), int) else None
        except (StoreForged, ValueError):
            return None  # a forged record is no member (the handshake refuses it anyway)

    def member(self, wid: int) -> tuple[int, str] | None:
        """``(incarnation, address)`` of ``wid``'s latest registration, or None."""
        d = self._read(f"members/{wid}")
        return None if d is None or not isinstance(d.get("addr"), str) else (
            d["inc"], d["addr"])

    def left(self, wid: int) -> tuple[int, str] | None:
        """``(incarnation, why)`` of ``wid``'s latest recorded leave, or None."""
        d = self._read(f"left/{wid}")
        return None if d is None else (d["inc"], str(d.get("why", ""))[:500])

    def snapshot(self, n: int, stop: Any = None) -> dict[int, tuple[int, str | None]]:
        """Every registered id below ``n``: (its latest incarnation, why it left or None
        if that incarnation has not left); cut short when ``stop()`` is true."""
        out: dict[int, tuple[int, str | None]] = {}
        for wid in range(n):
            if stop is not None and stop():
                break
            m = self.member(wid)
            if m is None:
                continue
            lf = self.left(wid)
            out[wid] = (m[0], lf[1] if lf is not None and lf[0] >= m[0] else None)
        return out


def member_registry(store: SignedStore, opts: Any) -> Registry | None:
    """The member registry of a run with connections on demand (RELAXSGD_CONNECT=demand),
    under the run's own prefix (``relaxsgd compare`` runs several in one store); None
    for a full mesh, where every death is seen at once by every worker."""
    if getattr(opts, "connect", "mesh") != "demand":
        return None
    return Registry(store.raw, store.key, store.timeout, store.where,
                    root=store.name("relaxsgd"))


def claim_id(raw: Any, world: int, max_workers: int) -> int:
    """A new joiner's id: the lowest never used (ids below ``world`` are the job's first
    workers), claimed atomically with the store's ``add``; :class:`JoinRefused` (one line)
    when the job already has ``max_workers`` ids."""
    k = int(raw.add(f"{ROOT}/{NEXT_ID}", 1))
    wid = world + k - 1
    if wid >= max_workers:
        raise JoinRefused(f"the job is full: it takes at most {max_workers} workers "
                          f"(elastic.max_workers), ids 0..{max_workers - 1} are all used; "
                          "raise elastic.max_workers when starting the job to take more")
    return wid


class Membership:
    """Mixin of :class:`~.transport.Transport`: who is live, as this worker knows it, and
    the ``on_member`` callbacks (the Transport interface of ELASTIC.md). Needs ``rank``,
    ``n``, ``dead``, ``_lock``, ``mark_dead``, ``_drop_links`` and ``_warn``."""

    rank: int
    n: int
    dead: dict[int, str]
    registry: Registry | None

    def _init_members(self, members: Any, incarnation: int) -> None:
        self.my_incarnation = incarnation
        self._known: set[int] = set(range(self.n) if members is None else members)
        self._known.add(self.rank)
        self._inc: dict[int, int] = {}  # a peer's incarnation as known here (default 0)
        self._member_cbs: list[Any] = []
        self.registry = None
        self._superseded = False
        self._leaves: list[tuple[int, str]] = []  # to record (by the watcher thread)
        self._members_stop = threading.Event()

    def live(self) -> frozenset[int]:
        """The ids this worker knows to be live, itself included."""
        with self._lock:  # type: ignore[attr-defined]
            return frozenset({r for r in self._known if r not in self.dead} | {self.rank})

    def on_member(self, callback: Any) -> None:
        """``callback(kind, worker, info)``, kind ``"leave"`` or ``"join"``, once per
        change, on a transport thread (keep it short; never raise)."""
        self._member_cbs.append(callback)

    def incarnation(self, worker: int) -> int:
        """``worker``'s incarnation as known here (0: the job's first start)."""
        return self.my_incarnation if worker == self.rank else self._inc.get(worker, 0)

    def _fire(self, kind: str, worker: int, info: str) -> None:
        for cb in list(self._member_cbs):
            try:
                cb(kind, worker, info)
            except Exception as e:  # noqa: BLE001 - a callback's bug is not the transport's
                self._warn(f"membership callback failed: {type(e).__name__}: {e}")  # type: ignore[attr-defined]

    def _newer(self, peer: int, inc: int) -> bool:
        """Would incarnation ``inc`` of ``peer`` be a change (a joiner, a restart)?"""
        return 0 <= peer < self.n and peer != self.rank and (
            peer not in self._known or inc > self._inc.get(peer, 0))

    def admit(self, peer: int, inc: int, how: str) -> bool:
        """Take incarnation ``inc`` of ``peer`` as live (a restarted worker or a joiner):
        its older incarnation, if still live here, is marked lost first (a "leave"), its
        old links are dropped, then "join" is told. False if it is not newer."""
        with self._lock:  # type: ignore[attr-defined]
            if not self._newer(peer, inc):
                return False
            was_live = peer in self._known and peer not in self.dead
        if was_live:
            self.mark_dead(peer, f"it restarted (incarnation {inc} {how})",  # type: ignore[attr-defined]
                           publish=False)
        # (one step under the connection table's lock: a new connection of this very
        # incarnation, admitted meanwhile by another thread, is never dropped)
        with self._joined:  # type: ignore[attr-defined]
            with self._lock:  # type: ignore[attr-defined]
                if not self._newer(peer, inc):
                    return False
                self._inc[peer] = inc
                self._known.add(peer)
                self.dead.pop(peer, None)
            self._drop_links(peer)  # type: ignore[attr-defined]
        self._fire("join", peer, f"incarnation {inc} ({how})")
        return True

    def _publish_leave(self, peer: int, why: str) -> None:
        """Queue the record of ``peer``'s leave for the watcher thread, the only thread
        that calls the store (a C++ store call in a daemon thread still running at the
        process's exit aborts the process; the watcher is stopped and joined at close)."""
        if self.registry is not None and not self._superseded:
            self._leaves.append((peer, why))

    def _write_leaves(self) -> None:
        while self._leaves:
            peer, why = self._leaves.pop(0)
            self._write_leave(peer, why)

    def _write_leave(self, peer: int, why: str) -> None:
        assert self.registry is not None
        if self._superseded:
            return
        try:
            mine = self.registry.member(self.rank)
            if mine is not None and mine[0] > self.my_incarnation:
                self._superseded = True  # a newer incarnation of this worker runs: a
                return  # stale process (frozen, then woken) must not accuse anyone
            self.registry.leave(peer, self.incarnation(peer), why)
        except Exception:  # noqa: BLE001 - the store gone: the launcher tells, or nobody
            pass

    def _stop_members(self, own_leave: str) -> None:
        """Stop the watcher (it writes what is queued), then record this worker's own
        leave from the calling thread."""
        if self._members_thread is None:  # type: ignore[attr-defined]
            return
        self._members_stop.set()
        self._members_thread.join(timeout=30.0)  # type: ignore[attr-defined]
        self._write_leaves()
        self._write_leave(self.rank, own_leave)

    def _check_self(self, inc: int, why: str | None) -> None:
        """This worker's own record: replaced by a newer incarnation, or declared gone
        by the others (frozen past their timeout, say): tell the callbacks once, as a
        "leave" of this worker (the runtime then stops; the launcher may restart it)."""
        if self._superseded or (inc == self.my_incarnation and why is None):
            return
        self._superseded = True
        self._fire("leave", self.rank, f"replaced by incarnation {inc}" if inc >
                   self.my_incarnation else f"the others count it as gone: {why}")

    def _watch_members(self) -> None:
        """Poll the registry's epoch; apply each change (see the module docstring)."""
        reg, seen = self.registry, -1
        assert reg is not None
        while not self._members_stop.wait(POLL_S):
            try:
                self._write_leaves()
                epoch = reg.epoch()
                if epoch == seen:
                    continue
                seen = epoch
                records = reg.snapshot(self.n, self._members_stop.is_set)
            except Exception:  # noqa: BLE001 - the store gone: nothing more to learn there
                continue
            for wid, (inc, why) in records.items():
                if wid == self.rank:
                    self._check_self(inc, why)
                    continue
                if why is None:
                    self.admit(wid, inc, "registered")
                elif self._newer(wid, inc):  # joined and left between two looks
                    with self._lock:  # type: ignore[attr-defined]
                        self._inc[wid] = inc
                        self._known.add(wid)
                        self.dead[wid] = why
                elif inc == self._inc.get(wid, 0) and wid not in self.dead:
                    self.mark_dead(wid, why, publish=False)  # type: ignore[attr-defined]
