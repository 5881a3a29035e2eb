"""Quorum collectives of an elastic dist job (relaxsgd.distributed.quorum), in one process.

A tiny in-process network stands in for the transport (messages delivered by one thread
per receiver, in order, between live workers), so the rounds run exactly as in a job:
each test checks a known number (who took part, the mean over exactly them)."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest
import torch

from relaxsgd.algorithms.base import AllGather, AllReduce
from relaxsgd.distributed.collectives import Counts
from relaxsgd.distributed.quorum import QuorumCollectives
from relaxsgd.membership import QuorumLost


class Net:
    """n workers' quorum sides; ``leave(i)`` drops i as the transport would."""

    def __init__(self, n: int, min_quorum: int = 1, wait_s: float = 5.0,
                 timeout_s: float = 10.0) -> None:
        self.live = set(range(n))
        self.q: dict[int, queue.Queue] = {i: queue.Queue() for i in range(n)}
        self.sent: list[tuple[int, int, str]] = []
        self.drop: set[tuple[int, int, str]] = set()  # (src, peer, kind) lost on the way
        self.side = {i: QuorumCollectives(i, n, self._sender(i), self._view(i), range(n),
                                          min_quorum, wait_s, timeout_s) for i in range(n)}
        for i in range(n):
            threading.Thread(target=self._deliver, args=(i,), daemon=True).start()

    def _sender(self, src: int) -> Any:
        def send(peer: int, msg: tuple) -> None:
            if src in self.live and peer in self.live and (src, peer, msg[0]) not in self.drop:
                self.sent.append((src, peer, msg[0]))
                self.q[peer].put((src, msg))
        return send

    def _view(self, i: int) -> Any:
        return lambda: frozenset(self.live)

    def _deliver(self, i: int) -> None:
        while True:
            src, msg = self.q[i].get()
            if src in self.live:
                self.side[i].on_message(src, msg)

    def leave(self, i: int) -> None:
        self.live.discard(i)
        for j in self.live:
            self.side[j].member_left(i)

    def reduce(self, i: int, k: int, value: float) -> Any:
        return self.side[i].all_reduce(k, AllReduce(torch.tensor([value])), Counts())


def _get(h: Any, timeout: float = 5.0) -> Any:
    assert h.event.wait(timeout), "the round did not end"
    return h.result()


def test_the_mean_counts_exactly_the_workers_that_took_part() -> None:
    net = Net(3)
    hs = [net.reduce(i, 0, v) for i, v in enumerate([1.0, 2.0, 6.0])]
    assert [float(_get(h)) for h in hs] == [3.0, 3.0, 3.0]
    # round 1: worker 2 is lost before contributing: the mean of the two others
    net.leave(2)
    hs = [net.reduce(i, 1, v) for i, v in enumerate([1.0, 4.0])]
    assert [float(_get(h)) for h in hs] == [2.5, 2.5]


def test_a_worker_lost_after_contributing_is_dropped_from_the_round() -> None:
    net = Net(3)
    h2 = net.reduce(2, 0, 9.0)
    time.sleep(0.3)  # its contribution reached the leader
    net.leave(2)
    hs = [net.reduce(i, 0, v) for i, v in enumerate([1.0, 3.0])]
    assert [float(_get(h)) for h in hs] == [2.0, 2.0]
    del h2  # (it is gone)


def test_a_lost_leader_is_replaced_by_the_next_lowest_id() -> None:
    net = Net(3)
    hs = {i: net.reduce(i, 0, v) for i, v in ((1, 2.0), (2, 4.0))}
    time.sleep(0.3)  # both wait for worker 0, which never contributes
    net.leave(0)
    assert [float(_get(hs[i])) for i in (1, 2)] == [3.0, 3.0]
    assert net.side[1].rounds == 1


def test_a_result_the_lost_leader_sent_to_some_only_is_adopted_by_the_new_leader() -> None:
    net = Net(3)
    net.drop.add((0, 1, "qres"))  # leader 0 dies after sending round 0's result to 2 only
    hs = [net.reduce(i, 0, v) for i, v in enumerate([1.0, 2.0, 6.0])]
    assert float(_get(hs[2])) == 3.0
    net.leave(0)
    assert float(_get(hs[1])) == 3.0  # worker 1 leads now and asks 2 for what it holds


def test_a_late_joiner_gets_the_finished_rounds_result_and_then_takes_part() -> None:
    net = Net(3)
    net.leave(2)
    hs = [net.reduce(i, 0, v) for i, v in enumerate([1.0, 3.0])]
    assert [float(_get(h)) for h in hs] == [2.0, 2.0]
    net.live.add(2)  # rejoined with the donor's round count
    assert float(_get(net.reduce(2, 0, 100.0))) == 2.0  # round 0 was over
    hs = [net.reduce(i, 1, v) for i, v in enumerate([1.0, 2.0, 6.0])]
    assert [float(_get(h)) for h in hs] == [3.0, 3.0, 3.0]


def test_below_the_minimum_the_round_waits_then_fails_naming_who_is_missing() -> None:
    net = Net(3, min_quorum=3, wait_s=0.4)
    net.leave(2)
    t = time.monotonic()
    hs = [net.reduce(i, 0, 1.0) for i in range(2)]
    with pytest.raises(QuorumLost) as e:
        _get(hs[0])
    assert time.monotonic() - t >= 0.4
    msg = str(e.value)
    assert "\n" not in msg and "missing [2]" in msg and "min_quorum=3" in msg, msg


def test_below_the_minimum_a_rejoin_within_the_wait_lets_the_round_go_on() -> None:
    net = Net(3, min_quorum=3, wait_s=3.0)
    net.leave(2)
    hs = [net.reduce(i, 0, v) for i, v in enumerate([1.0, 2.0])]
    time.sleep(0.3)
    net.live.add(2)
    hs.append(net.reduce(2, 0, 6.0))
    assert [float(_get(h)) for h in hs] == [3.0, 3.0, 3.0]


def test_all_gather_lists_by_worker_id_with_none_for_non_participants() -> None:
    net = Net(3)
    net.leave(1)
    hs = [net.side[i].all_gather(0, AllGather({"r": i}, 8), Counts()) for i in (0, 2)]
    for h in hs:
        assert _get(h) == [{"r": 0}, None, {"r": 2}]
