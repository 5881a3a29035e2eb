"""The simulator's parameter server: a node of the network model that serves ServerRounds.

:class:`ServerNode` is a mixin of :class:`~.engine.Engine`. The server's math is the
algorithm's (:meth:`~relaxsgd.algorithms.base.Algorithm.server`, one definition for both
runtimes, :mod:`relaxsgd.algorithms.server`); here it only gets a place in virtual time:
each worker's k-th :class:`~relaxsgd.algorithms.base.ServerRound` is its upload of round k,
which leaves the worker's link and is received through the server's own
(:meth:`.network.Network.to_server`); when all n are in, the server computes for
:func:`~relaxsgd.algorithms.server.server_seconds` plus the codec time of its own
compression (its ``serve`` metered, :mod:`relaxsgd.codec_meter`, at the profile's costs,
speed factor 1) and sends one reply per worker, in rank order, out of its link
(:meth:`.network.Network.from_server`). The worker's handle resolves when its reply
arrives. Several rounds may be in flight (OLCO3 with ``s`` > 0 uploads round k+1 before
round k's reply): each upload carries its round number (``ServerRound.round``), and the
server serves the rounds in order, one at a time. As in the distributed runtime, whose
server is a thread of worker 0 (:mod:`relaxsgd.distributed.server`), worker 0's upload
and reply do not travel: its upload is in when it is made, its reply when the round is
served, and neither takes a link or a latency (so worker 1's round pays two per-message
overheads, its upload's and its reply's, the first to leave the server); their bytes are
counted all the same, as the runtime counts them. Bytes: an upload counts as the
worker's (``bytes_sent``), the replies as the server's (``server_bytes``,
``server_messages``), with retransmissions.
The server's state (residual, round) is saved with the engine's checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from ..algorithms.base import Algorithm, Handle, ServerRound
from ..algorithms.server import server_seconds
from ..codec_meter import metering

SERVER_RANK = 0  # the worker whose process hosts the server (relaxsgd.distributed.server)


class ServerNode:
    """Mixin: the engine's parameter server (see the module docstring)."""

    n: int
    procs: list[Any]
    net: Any
    algo: Algorithm
    server_bytes: int
    server_messages: int
    now: float
    compute: Any
    at: Callable[..., None]
    _resolve: Callable[[Handle, Any], None]
    _count: Callable[[Any, float, int], None]

    def _init_server(self, algo: Algorithm, workers: list[Any]) -> None:
        self._rounds: dict[int, dict] = {}  # rounds whose uploads are not all in
        self._server_free = 0.0  # when the server has computed its last round
        self.server = algo.server()
        w0 = workers[0]
        self.server_state: dict[str, Any] | None = (
            self.server.init_state(w0.params.numel(), w0.layout, w0.params.device)
            if self.server is not None else None)

    def _server_round(self, p: Any, eff: ServerRound) -> Handle:
        """An upload of round ``eff.round`` (or ``p.server_seq``): through the worker's
        link into the server's (:meth:`.network.Network.to_server`); the round is served
        once all n are in and every earlier round has been served."""
        if self.server is None:
            raise TypeError(f"{self.algo.name} yields ServerRound but has no server "
                            "(Algorithm.server() returned None)")
        seq = p.server_seq if eff.round is None else eff.round
        p.server_seq = max(p.server_seq, seq + 1)
        # (worker 0 hosts the server: its upload does not travel)
        got, tries = ((self.now, 1) if p.w.rank == SERVER_RANK else
                      self.net.to_server(p.w.rank, eff.nbytes, self.now))
        self._count(p, eff.nbytes * tries, tries)
        if getattr(self, "members", None) is not None:  # churn: a quorum round (.churn)
            return self.quorum_join(p, eff, "server", seq, got)  # type: ignore[attr-defined]
        h = Handle(f"server round #{seq}")
        r = self._rounds.setdefault(seq, {"members": {}, "t": 0.0})
        r["members"][p.w.rank] = (eff, h)
        r["t"] = max(r["t"], got)
        if len(r["members"]) == self.n:
            # Rounds complete in order: each worker issues its rounds in program order
            # (a spawn's ServerRound is dispatched when it is spawned), so the last upload
            # of round k+1 comes after every worker's of round k. The server still serves
            # one round at a time (``_server_free``): round k+1's uploads may all be in
            # before round k is computed.
            assert self.server_state is not None and seq == self.server_state["round"]
            self._serve(self._rounds.pop(seq))
        return h

    def _serve(self, r: dict) -> None:
        """Serve a round whose uploads are all in (received by ``r["t"]``): one reply per
        worker, in rank order."""
        effs = [r["members"][k][0] for k in range(self.n)]
        self._serve_uploads(effs, r["t"], [(k, r["members"][k][1], e.down_nbytes)
                                           for k, e in enumerate(effs)])

    def _serve_uploads(self, effs: list[ServerRound], t: float,
                       to: list[tuple[int, Handle, int]]) -> tuple[float, Any]:
        """The server computes on the uploads ``effs`` (all in by ``t``) for
        :func:`server_seconds` plus its own compression's codec time, then sends each
        ``(rank, handle, bytes)`` of ``to`` a reply of its own (as over a network), in that
        order out of its link; worker 0's takes no hop (its host). ``(the last arrival,
        the reply)``; a full round (:meth:`_serve`) and a quorum round under churn
        (:mod:`.churn`) are both served here."""
        assert self.server is not None and self.server_state is not None
        with metering() as work:  # the server's own compression (error feedback)
            reply = self.server.serve(self.server_state, [e.payload for e in effs])
        # (one round at a time: a round complete earlier waits for the one before)
        ready = (max(t, self._server_free)
                 + server_seconds(len(effs), self.procs[0].w.params.numel())
                 + self.compute.work_time(None, work))
        self._server_free = ready
        end = ready
        for rank, handle, nbytes in to:
            arrive, tries = ((ready, 1) if rank == SERVER_RANK else  # (its host: no hop)
                             self.net.from_server(nbytes, ready, rank))
            self.server_bytes += int(nbytes) * tries
            self.server_messages += tries
            self.at(arrive, self._resolve, handle, copy.deepcopy(reply))
            end = max(end, arrive)
        return end, reply
