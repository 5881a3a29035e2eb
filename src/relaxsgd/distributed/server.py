"""The distributed runtime's parameter server: a role hosted by a thread of rank 0.

The server's math is the algorithm's (:meth:`~relaxsgd.algorithms.base.Algorithm.server`,
:mod:`relaxsgd.algorithms.server`: the simulator runs the very same object). Here it gets
a place in the job: :class:`ServerHost` lives in rank 0's process and serves the rounds;
:func:`server_round` is how every worker's executor fulfils a
:class:`~relaxsgd.algorithms.base.ServerRound`.

Why a thread of rank 0 and not a process of its own: a process would be an extra rank that
torchrun and the launcher must start, that every collective of the workers must leave out
(a process group of its own for the workers), and whose failure, start-up and checkpoint
need their own paths; a thread on rank 0 is one hop away from every other worker and zero
hops from rank 0, which shares its link and its core with the server. For the algorithms
that use a server (top-k messages of 1% of the model, a round every p local steps) the
server's traffic and compute are small next to the worker's own, and the simulator's server
node (its own link) is then the right model to within rank 0's own upload, which skips the
network here.

Protocol, over the authenticated point-to-point transport (:mod:`.transport`, ``msg``
messages, so frames are authenticated and checked like every other): worker r's k-th
ServerRound sends ``("msg", ("ps", k), (payload, down_nbytes))`` to rank 0 and waits for
``("msg", ("ps", k), reply)`` from it (rank 0 hands its own upload to the host directly).
When the n uploads of round k are in and every earlier round has been served, the host
calls ``serve`` on the thread that delivered the last one and sends the reply to each
worker. Rounds are pipelined: a worker uploads round k+1 when it is ready, before round
k's reply (OLCO3 with ``s`` > 0; the round's number comes with the effect,
``ServerRound.round``, so spawns that race to send do not swap rounds), and the host
keeps the uploads of up to :data:`~relaxsgd.algorithms.server.MAX_ROUNDS_AHEAD` rounds
past the one it serves next. Uploads are checked before they are kept: the round must be
one of those, one upload per worker and round, and the payload must decode to the
model's size; a worker that breaks a rule is dropped as lost (its message was invalid).

Faults. A worker that waits for a reply fails with one line naming the server (a
:class:`~.transport.PeerLost`: "the parameter server (a thread of worker 0) is lost: ...")
when rank 0 dies, stops, or does not answer within ``RELAXSGD_TIMEOUT``; on rank 0, a
round that can never complete (a worker is lost) fails rank 0's own wait naming that
worker. Either way a synchronous run fails on every worker (rank 0 tells the others).

Checkpoints: the host's state (the server's state, its round) is saved in rank 0's file
and the worker's round counter in every rank's (:mod:`.saving`); a synchronous
checkpoint is taken when every worker has its replies, so no round is half-served.
"""

from __future__ import annotations

import threading
from typing import Any

from ..algorithms.base import PeerUnavailable, ServerRound
from ..algorithms.server import MAX_ROUNDS_AHEAD
from .collectives import DHandle
from .transport import PeerLost
from .wire import WireError

SERVER_RANK = 0
TAG = "ps"


def lost_line(why: str) -> str:
    return f"the parameter server (a thread of worker {SERVER_RANK}) is lost: {why}"


class _ReplyHandle(DHandle):
    """A reply awaited from the server; a lost rank 0 is named as the server."""

    __slots__ = ()

    def fail(self, error: BaseException) -> None:
        if isinstance(error, PeerUnavailable) and error.peer == SERVER_RANK:
            error = PeerLost(lost_line(error.reason))
        super().fail(error)


class ServerHost:
    """Rank 0's server role: collects each round's uploads, serves, replies."""

    def __init__(self, server: Any, numel: int, layout: Any, n: int, tr: Any,
                 counts: Any, device: Any = None) -> None:
        self.server, self.n, self.tr, self.counts = server, n, tr, counts
        self.state = server.init_state(numel, layout, device)
        self.round = 0  # the next round to serve
        # the uploads of the rounds not served yet: round -> {worker: (payload, down)}
        self.uploads: dict[int, dict[int, tuple[Any, float]]] = {}
        self.local: dict[int, DHandle] = {}  # rank 0's own waits, by round
        self.lock = threading.Lock()
        tr.on_dead.append(self._peer_dead)

    # -- uploads -----------------------------------------------------------------------
    def on_message(self, src: int, msg: tuple) -> bool:
        """Take ``msg`` if it is an upload (a transport thread); False otherwise."""
        tag = msg[1] if msg[0] == "msg" else None
        if not (type(tag) is tuple and len(tag) == 2 and tag[0] == TAG):
            return False
        body = msg[2]
        if type(body) is not tuple or len(body) != 2 or not isinstance(body[1], (int, float)):
            raise WireError("an upload to the parameter server that is not (payload, nbytes)")
        self.upload(src, tag[1], body[0], float(body[1]))
        return True

    def upload(self, src: int, k: Any, payload: Any, down: float,
               local: DHandle | None = None) -> None:
        """Worker ``src``'s upload of round ``k`` (``local``: rank 0's own wait)."""
        check = getattr(self.server, "check", None)
        if check is not None:
            try:
                check(payload)
            except (ValueError, TypeError, RuntimeError) as e:
                raise WireError(f"an upload that is not a message of the model "
                                f"({str(e)[:200]})") from None
        served = []
        with self.lock:
            if type(k) is not int or not self.round <= k < self.round + MAX_ROUNDS_AHEAD:
                raise WireError(f"an upload for round {k!r} while the parameter server is at "
                                f"round {self.round} (it keeps up to {MAX_ROUNDS_AHEAD} "
                                "ahead)")
            got = self.uploads.setdefault(k, {})
            if src in got:
                raise WireError(f"a second upload for round {k}")
            got[src] = (payload, down)
            if local is not None:
                self.local[k] = local
            if len(got) < self.n:
                lost = [r for r in sorted(self.tr.dead) if r not in got]
                if lost:  # lost before this round began
                    self._fail_local(lost[0], self.tr.dead[lost[0]])
            # serve every complete round in order (a later one may be complete first)
            while len(self.uploads.get(self.round, ())) == self.n:
                k0 = self.round
                got0 = self.uploads.pop(k0)
                self.round += 1
                reply = self.server.serve(self.state, [got0[r][0] for r in range(self.n)])
                served.append((k0, reply, got0, self.local.pop(k0, None)))
        # (replies go out outside the lock: sending may wait for the socket, and the
        # readers of other workers' uploads must not; a worker's mail is keyed by round)
        for item in served:
            self._reply(*item)

    def _reply(self, k: int, reply: Any, got: dict[int, tuple[Any, float]],
               local: DHandle | None) -> None:
        for r in range(self.n):
            with self.counts._lock:  # declared bytes: the server's, as in the simulator
                self.counts.server_bytes += int(got[r][1])
                self.counts.server_messages += 1
            if r != SERVER_RANK:
                self.tr.send(r, ("msg", (TAG, k), reply))
        if local is not None:
            local.resolve(reply)

    def _peer_dead(self, peer: int, why: str) -> None:
        """A worker lost: the rounds without its upload can never complete on rank 0."""
        with self.lock:
            self._fail_local(peer, why)

    def _fail_local(self, peer: int, why: str) -> None:
        """Fail rank 0's waits for the rounds that lack ``peer``'s upload (under the
        lock)."""
        for k, h in sorted(self.local.items()):
            if peer not in self.uploads.get(k, {}):
                h.fail(PeerLost(f"lost worker {peer}, so the parameter server cannot "
                                f"complete round {k}: {why}"))

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        with self.lock:
            if any(self.uploads.values()):
                raise RuntimeError("the parameter server holds uploads of an unfinished "
                                   "round at a checkpoint")
            return {"state": self.state, "round": self.round}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        with self.lock:
            self.state, self.round = s["state"], int(s["round"])


def server_round(ex: Any, eff: ServerRound) -> DHandle:
    """Fulfil a ServerRound on executor ``ex``: its upload of round ``eff.round`` (the
    worker's count in program order), else of round ``ex.server_seq``."""
    k = ex.server_seq if eff.round is None else eff.round
    ex.server_seq = max(ex.server_seq, k + 1)
    ex.counts.add(eff.nbytes, 1, 0)
    elastic = getattr(ex, "quorum_server", None)
    if elastic is not None:  # an elastic job: a quorum round led by rank 0 (.quorum_server)
        return elastic.server_round(k, eff)
    host: ServerHost | None = ex.server_host
    if ex.rank == SERVER_RANK:
        if host is None:
            raise TypeError(f"{ex.algo.name} yields ServerRound but has no server "
                            "(Algorithm.server() returned None)")
        h = DHandle(f"parameter server round {k}")
        host.upload(SERVER_RANK, k, eff.payload, float(eff.down_nbytes), local=h)
        return h
    key = (SERVER_RANK, (TAG, k))  # (several rounds may be awaited at once: by round)
    h = _ReplyHandle(f"the parameter server's reply of round {k}", peer=SERVER_RANK,
                     deadline=_deadline(ex))
    with ex.lock:
        found, reply = ex.mail.take(key)
        if found:
            h.resolve(reply)
        elif SERVER_RANK in ex.tr.dead:
            h.fail(PeerUnavailable(SERVER_RANK, ex.tr.dead[SERVER_RANK]))
        else:
            ex.mail.wait(key, h)
    ex.tr.send(SERVER_RANK, ("msg", (TAG, k), (eff.payload, float(eff.down_nbytes))),
               _failed(h))
    return h


def _deadline(ex: Any) -> float:
    import time

    return time.monotonic() + ex.opts.timeout_s


def _failed(h: DHandle) -> Any:
    def done(err: BaseException | None) -> None:
        if err is not None:
            h.fail(PeerUnavailable(SERVER_RANK, f"uploading failed: {err}"))
    return done


def make_host(algo: Any, w: Any, n: int, rank: int, tr: Any, counts: Any) -> ServerHost | None:
    """Rank 0's server role when the algorithm has a server (None elsewhere)."""
    server = algo.server() if rank == SERVER_RANK else None
    if server is None:
        return None
    return ServerHost(server, w.params.numel(), w.layout, n, tr, counts, w.params.device)
