"""relaxsgd.mailbox.Mailbox: the Send/Recv matching both runtimes use (no runtime here)."""

from __future__ import annotations

import random
from collections import deque

from relaxsgd.mailbox import Mailbox


class _H:
    """A receiver handle as the runtimes have one: ``done`` once resolved or timed out."""

    def __init__(self, name: str) -> None:
        self.name, self.done = name, False

    def __repr__(self) -> str:
        return self.name


def test_payloads_are_taken_first_in_first_out_per_source_and_tag() -> None:
    m: Mailbox[_H] = Mailbox()
    assert m.deliver((1, "a"), "a1") is None and m.deliver((1, "a"), "a2") is None
    assert m.deliver((1, "b"), "b1") is None and m.deliver((2, "a"), "x1") is None
    assert m.held(1) == 3 and m.held(2) == 1 and m.held(0) == 0
    assert m.take((1, "a")) == (True, "a1")
    assert m.take((2, "a")) == (True, "x1")
    assert m.take((1, "a")) == (True, "a2")
    assert m.take((1, "a")) == (False, None)  # nothing left under that key
    assert m.take((1, "b")) == (True, "b1")
    assert m.held(1) == 0 and m.inbox == {} and m._held == {}  # empty tables are dropped


def test_waiting_receivers_get_payloads_in_the_order_they_came() -> None:
    m: Mailbox[_H] = Mailbox()
    r1, r2, other = _H("r1"), _H("r2"), _H("other")
    m.wait((0, 7), r1)
    m.wait((0, 7), r2)
    m.wait((0, 8), other)
    assert m.deliver((0, 7), "p") is r1  # given to the first; the caller resolves it
    assert m.deliver((0, 7), "q") is r2
    assert m.deliver((0, 7), "r") is None  # nobody waits any more: held
    assert m.held(0) == 1 and list(m.inbox[(0, 7)]) == ["r"]
    assert list(m.waiters) == [(0, 8)]  # the empty line was dropped
    assert m.take((0, 8)) == (False, None)


def test_stale_receivers_are_skipped_and_forgotten() -> None:
    m: Mailbox[_H] = Mailbox(stale=lambda h: h.done)
    gone, alive = _H("gone"), _H("alive")
    m.wait((3, 0), gone)
    m.wait((3, 0), alive)
    gone.done = True  # e.g. its Recv timed out
    assert m.deliver((3, 0), "p") is alive
    assert m.waiters == {}
    late = _H("late")
    m.wait((3, 0), late)
    late.done = True
    assert m.deliver((3, 0), "q") is None  # only stale ones waited: the payload is held
    assert m.waiters == {} and m.take((3, 0)) == (True, "q")


def test_without_a_stale_test_every_receiver_counts() -> None:
    m: Mailbox[_H] = Mailbox()
    h = _H("h")
    h.done = True
    m.wait((0, 0), h)
    assert m.deliver((0, 0), "p") is h


def test_claim_and_hold_are_deliver_in_two_steps_for_a_bounded_caller() -> None:
    m: Mailbox[_H] = Mailbox()
    assert m.claim((1, 0)) is None
    m.hold((1, 0), "p")
    m.hold((1, 1), "q")
    assert m.held(1) == 2
    h = _H("h")
    m.wait((1, 2), h)
    assert m.claim((1, 2)) is h and m.waiters == {}


def test_drop_waiters_removes_only_that_sources_receivers() -> None:
    m: Mailbox[_H] = Mailbox()
    a, b, c, d = (_H(s) for s in "abcd")
    m.wait((5, 0), a)
    m.wait((6, 0), b)
    m.wait((5, 1), c)
    m.wait((5, 0), d)
    m.hold((5, 9), "kept")
    assert m.drop_waiters(5) == [a, d, c]  # key order, then line order
    assert list(m.waiters) == [(6, 0)] and m.drop_waiters(5) == []
    assert m.take((5, 9)) == (True, "kept")  # payloads are not touched


def test_load_inbox_restores_payloads_and_their_counts() -> None:
    m: Mailbox[_H] = Mailbox()
    m.hold((9, 9), "old")
    m.load_inbox({(1, "t"): deque(["a", "b"]), (2, "t"): deque(), (1, "u"): deque(["c"])})
    assert m.held(1) == 3 and m.held(2) == 0 and m.held(9) == 0
    assert (2, "t") not in m.inbox and (9, 9) not in m.inbox
    assert m.take((1, "t")) == (True, "a") and m.held(1) == 2


def test_random_traffic_matches_a_reference_model() -> None:
    """Random Sends, Recvs and timeouts against the obvious model: per key, a receiver
    gets the oldest unreceived payload, and a payload the oldest live receiver."""
    rng = random.Random(0)
    m: Mailbox[_H] = Mailbox(stale=lambda h: h.done)
    sent: dict[tuple, list] = {}  # key -> payloads in sending order
    asked: dict[tuple, list] = {}  # key -> receivers that got nothing at once, in order
    got: dict[str, object] = {}
    keys = [(s, t) for s in range(3) for t in range(2)]
    for i in range(3000):
        key = rng.choice(keys)
        op = rng.random()
        if op < 0.45:
            payload = f"m{i}"
            sent.setdefault(key, []).append(payload)
            w = m.deliver(key, payload)
            if w is not None:
                assert not w.done, f"{w} timed out but got {payload}"
                got[w.name] = payload
                w.done = True
        elif op < 0.9:
            h = _H(f"r{i}")
            found, payload = m.take(key)
            if found:
                got[h.name] = payload
            else:
                m.wait(key, h)
            asked.setdefault(key, []).append(h)
        else:  # a waiting receiver times out
            waiting = [h for h in asked.get(key, []) if not h.done]
            if waiting:
                rng.choice(waiting).done = True
        assert sum(m.held(s) for s in range(3)) == sum(len(b) for b in m.inbox.values())
    for key in keys:
        received = [got[h.name] for h in asked.get(key, []) if h.name in got]
        # each key's payloads reach receivers in sending order, and none twice
        assert received == sent.get(key, [])[:len(received)]
        left = list(m.inbox.get(key, []))
        assert received + left == sent.get(key, [])
        if left:  # payloads held only while no live receiver waits
            assert all(h.done for h in m.waiters.get(key, []))


def _p2p() -> object:
    """The dist executor's point-to-point half over a fake transport (no sockets)."""
    import threading
    import types

    import torch

    from relaxsgd.distributed.p2p import PointToPoint

    class P(PointToPoint):
        pass

    p = P()
    p.tr = types.SimpleNamespace(on_dead=[], dead={})
    p.lock = threading.RLock()
    p.device = torch.device("cpu")
    p.opts = types.SimpleNamespace(timeout_s=60.0)
    p._init_p2p()
    return p


def test_the_dist_side_bounds_unreceived_messages_per_source(monkeypatch) -> None:
    import pytest

    import relaxsgd.distributed.p2p as p2p
    from relaxsgd.algorithms.base import Recv
    from relaxsgd.distributed.sockets import PeerLost

    monkeypatch.setattr(p2p, "MAX_INBOX", 3)
    p = _p2p()
    for k in range(3):
        p.on_message(1, ("msg", "t", k))
    p.on_message(2, ("msg", "t", "other source"))  # the bound is per source
    with pytest.raises(PeerLost, match="more than 3 messages nobody received"):
        p.on_message(1, ("msg", "u", 99))
    assert p._recv(Recv(1, tag="t")).result() == 0  # a Recv frees a place
    p.on_message(1, ("msg", "u", 99))
    assert p.mail.held(1) == 3 and p.mail.held(2) == 1


def test_the_dist_side_skips_timed_out_recvs_and_fails_a_lost_peers() -> None:
    from relaxsgd.algorithms.base import PeerUnavailable, Recv

    p = _p2p()
    late, ontime = p._recv(Recv(1, tag="t")), p._recv(Recv(1, tag="t"))
    late.fail(TimeoutError("timed out"))  # what _timed_out does to it
    p.on_message(1, ("msg", "t", "p"))
    assert ontime.done and ontime.result() == "p"
    waiting = p._recv(Recv(2, tag="t"))
    p._peer_dead(2, "its connection closed")
    assert waiting.done and isinstance(waiting.error, PeerUnavailable)
    assert p.mail.waiters == {}
