"""The parameter server's rounds of an elastic dist job (relaxsgd.distributed.quorum_server),
in one process: the server (identity compressors, no error feedback) serves exactly the
round's participants, so its reply is their mean; a lost rank 0 (the server's host) fails
the round naming the server."""

from __future__ import annotations

import queue
import threading
from typing import Any

import pytest
import torch

from relaxsgd.algorithms.base import ServerRound
from relaxsgd.algorithms.server import ParameterServer
from relaxsgd.compress.spec import make_compressor
from relaxsgd.distributed.collectives import Counts
from relaxsgd.distributed.quorum_server import ServerQuorum, from_wire, wire_send
from relaxsgd.distributed.server import ServerHost
from relaxsgd.distributed.transport import PeerLost
from test_quorum import _get  # a round's result, or the test fails if it never ends

NUMEL = 2


class _Tr:
    def __init__(self) -> None:
        self.on_dead: list[Any] = []


class Net:
    """n workers' server-round sides on an in-process network (messages renamed to the
    server rounds' wire kinds and back, as the runtime sends them)."""

    def __init__(self, n: int) -> None:
        self.live = set(range(n))
        self.q: dict[int, queue.Queue] = {i: queue.Queue() for i in range(n)}
        ident = make_compressor("identity")
        self.counts = [Counts() for _ in range(n)]
        self.host = ServerHost(ParameterServer(ident, ident, False, 0), NUMEL, None, n,
                               _Tr(), self.counts[0])
        self.side = {i: ServerQuorum(self.host if i == 0 else None, self.counts[i], i, n,
                                     wire_send(self._sender(i)),
                                     lambda: frozenset(self.live), range(n), 1, 5.0, 5.0)
                     for i in range(n)}
        for i in range(n):
            threading.Thread(target=self._deliver, args=(i,), daemon=True).start()

    def _sender(self, src: int) -> Any:
        def send(peer: int, msg: tuple) -> None:
            assert msg[0] in ("spart", "sres", "sneed")  # never the collectives' kinds
            if src in self.live and peer in self.live:
                self.q[peer].put((src, msg))
        return send

    def _deliver(self, i: int) -> None:
        while True:
            src, msg = self.q[i].get()
            if src in self.live:
                self.side[i].on_message(src, from_wire(msg))

    def leave(self, i: int) -> None:
        self.live.discard(i)
        for j in self.live:
            self.side[j].member_left(i)

    def upload(self, i: int, k: int, value: float) -> Any:
        eff = ServerRound(torch.full((NUMEL,), value), 4 * NUMEL, 4 * NUMEL)
        return self.side[i].server_round(k, eff)


def test_the_server_serves_the_mean_of_exactly_the_workers_that_took_part() -> None:
    net = Net(3)
    hs = [net.upload(i, 0, v) for i, v in enumerate([1.0, 2.0, 6.0])]
    for h in hs:
        torch.testing.assert_close(_get(h), torch.full((NUMEL,), 3.0))
    net.leave(2)  # round 1: worker 2 is gone: the mean of the two others
    hs = [net.upload(i, 1, v) for i, v in enumerate([1.0, 4.0])]
    for h in hs:
        torch.testing.assert_close(_get(h), torch.full((NUMEL,), 2.5))
    assert net.host.state["round"] == 2
    assert net.counts[0].server_messages == 3 + 2  # one reply per participant


def test_a_lost_rank_0_fails_the_round_naming_the_parameter_server() -> None:
    net = Net(3)
    net.leave(0)
    h = net.upload(1, 0, 1.0)
    assert h.event.wait(5.0)
    with pytest.raises(PeerLost, match="parameter server"):
        h.result()
