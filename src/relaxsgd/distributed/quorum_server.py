"""The parameter server's rounds in an elastic dist job: quorum rounds led by the server.

In a job that is not elastic a ``ServerRound`` waits for the uploads of all n workers
(:mod:`.server`). In an elastic job (issue 20, ELASTIC.md item 4) server round k is a
quorum round (:mod:`.quorum`), as in the simulator under churn
(:meth:`relaxsgd.sim.churn.ChurnNode._serve_quorum`): its participants are the workers
present at its start that are still live when every one of them has uploaded, and the
server serves their uploads only, in id order, so the mean it compresses is over the
participants (weights 1/participants, :meth:`relaxsgd.algorithms.server.ParameterServer
.serve`). A departed worker's uploads not yet served are dropped with it (its error
feedback residual is its own: it leaves with it); a newcomer takes part from its first
upload, with the donor's round counter and its own residual zeroed by
``Algorithm.adopt``.

The leader of a server round is always the server host, rank 0 (a thread of its process,
which holds the server's state: residual, round): the quorum's leader is the lowest live
id, which is 0 while rank 0 lives. When rank 0 is lost, the server's state is lost with
it, and every worker waiting for a server round fails with one line naming it (a job
loses rank 0 only with its outputs too: docs/distributed.md).

Messages are the quorum's, under kinds of their own (``spart``, ``sres``, ``sneed``), so
server rounds and collectives are numbered apart; an upload to the host is checked
against the model's message form before it is kept (a malformed one drops its sender,
as the non-elastic host does).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..algorithms.base import ServerRound
from .collectives import Counts
from .quorum import GATHER, QHandle, QuorumCollectives
from .server import SERVER_RANK, ServerHost, lost_line
from .transport import PeerLost
from .wire import WireError

KIND = {"qpart": "spart", "qres": "sres", "qneed": "sneed"}  # quorum kind -> wire kind
BACK = {v: k for k, v in KIND.items()}


class ServerQuorum(QuorumCollectives):
    """One worker's side of the elastic server rounds (see the module docstring).

    ``host``: rank 0's :class:`~.server.ServerHost` (None on the other workers);
    ``counts``: the executor's byte counters (the host counts the replies there, as the
    non-elastic host does); the rest as :class:`~.quorum.QuorumCollectives`, whose
    ``send`` here gets the quorum's message kinds (:func:`wire_send` renames them)."""

    def __init__(self, host: ServerHost | None, counts: Counts, rank: int, n_max: int,
                 send: Callable[[int, tuple], Any], live: Callable[[], frozenset[int]],
                 initial: range | set[int], min_quorum: int = 1,
                 quorum_wait_s: float = 60.0, timeout_s: float = 120.0) -> None:
        super().__init__(rank, n_max, send, live, initial, min_quorum, quorum_wait_s,
                         timeout_s)
        self.host, self.counts = host, counts

    def server_round(self, k: int, eff: ServerRound) -> QHandle:
        """Upload this worker's ``eff`` as its part of server round ``k``; the handle's
        value is the server's reply."""
        h = QHandle(f"parameter server round {k}", collective=False)
        self._start(k, GATHER, (eff.payload, float(eff.down_nbytes)), h,
                    lambda value: value[1])
        return h

    def _lead(self, k: int, mode: int, mine: Any, start: float,
              took_over: bool) -> tuple[tuple[int, ...], Any]:
        if self.rank != SERVER_RANK or self.host is None:  # rank 0 (the server) is lost
            raise PeerLost(lost_line(f"worker {SERVER_RANK} left the job, and the server's "
                                     f"state with it (round {k} cannot be served)"))
        return super()._lead(k, mode, mine, start, took_over)

    def _finish_round(self, k: int, mode: int, parts: list[int],
                      got: dict[int, Any]) -> None:
        """Serve round ``k`` to its participants (``self.cv`` held; the host's lock
        orders it with a checkpoint's read of the server's state)."""
        host = self.host
        assert host is not None
        with host.lock:
            reply = host.server.serve(host.state, [got[p][0] for p in parts])
            host.round += 1
        with self.counts._lock:  # declared bytes: the server's, one reply per participant
            self.counts.server_bytes += sum(int(got[p][1]) for p in parts)
            self.counts.server_messages += len(parts)
        self.results[k] = (tuple(parts), reply)

    def on_message(self, src: int, msg: tuple) -> bool:
        """A server round's message (its quorum kind); an upload is checked first."""
        if msg[0] == "qpart" and self.host is not None:
            body = msg[3]
            if type(body) is not tuple or len(body) != 2:
                raise WireError("an upload to the parameter server that is not "
                                "(payload, nbytes)")
            check = getattr(self.host.server, "check", None)
            if check is not None:
                try:
                    check(body[0])
                except (ValueError, TypeError, RuntimeError) as e:
                    raise WireError(f"an upload that is not a message of the model "
                                    f"({str(e)[:200]})") from None
        return super().on_message(src, msg)


def wire_send(send: Callable[[int, tuple], Any]) -> Callable[[int, tuple], Any]:
    """``send`` with the quorum's message kinds renamed to the server rounds' own."""
    return lambda peer, msg: send(peer, (KIND[msg[0]], *msg[1:]))


def from_wire(msg: tuple) -> tuple | None:
    """A server round's message with its quorum kind (None: not one)."""
    kind = BACK.get(msg[0])
    return None if kind is None else (kind, *msg[1:])
