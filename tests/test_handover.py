"""Live recovery (relaxsgd.distributed.handover): a rejoined worker's model and state equal
its donor's at the moment of transfer, through the real wire format, in one process."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from relaxsgd.bank import Bank
from relaxsgd.config import from_dict
from relaxsgd.distributed.handover import Donor, Joiner, pack
from relaxsgd.distributed.process import own_shard
from relaxsgd.distributed.wire import WireError, check_message, decode, encode
from relaxsgd.run import prepare
from relaxsgd.worker import LocalWorker

CFG = {"task": "logreg", "task_options": {"n_train": 120, "n_test": 40, "dim": 6,
                                          "classes": 3},
       "workers": 2, "steps": 20, "algo": "swarm",
       "train": {"batch_size": 8, "lr": 0.1, "momentum": 0.9}}


def _wire(msg: tuple) -> tuple:
    """What the peer decodes of ``msg`` (the transport's encoding and checks)."""
    return check_message(decode(bytearray(b"".join(bytes(f) for f in encode(msg)))))


class _Tr:
    def __init__(self, rank: int) -> None:
        self.rank, self.peers = rank, {}

    def send(self, peer: int, msg: tuple) -> int:
        self.peers[peer](self.rank, _wire(msg))
        return 0


def _job(rank: int) -> Any:
    cfg = from_dict(CFG)
    prep = prepare(cfg)
    spec, shards = own_shard(prep, rank)
    bank = Bank(spec, cfg.train, [rank], shards, cfg.seed, prep.total_steps)
    w = LocalWorker(bank, 0, 2, cfg.seed, prep.total_steps)
    prep.algo.init_worker(w)
    ex = SimpleNamespace(lock=threading.RLock(), w=w, coll_seq=0, server_seq=0, spawns=0,
                         last_pos=0.0, t0=time.perf_counter(), wall_offset=0.0,
                         now=lambda: 7.5, _block=lambda h, ctx: None, quorum=None)
    return SimpleNamespace(ex=ex, bank=bank, w=w, snap=SimpleNamespace(next=0), rank=rank,
                           tr=_Tr(rank), prep=prep)


def _pair() -> tuple[Any, Any, Donor, Joiner]:
    d, j = _job(0), _job(1)
    donor, joiner = Donor(d), Joiner(j)
    d.tr.peers[1] = lambda src, m: joiner.on_hand(src, *m[1:])
    j.tr.peers[0] = lambda src, m: donor.ask(src, m[1])
    return d, j, donor, joiner


def _donor_loop(d: Any, donor: Donor, stop: threading.Event) -> None:
    """The donor's program: local steps, then a safe point, until stopped."""
    while not stop.is_set():
        d.bank.local_steps([0], 1)
        d.w.state["xhat"].add_(0.01)
        d.ex.coll_seq += 1
        if donor.due():
            donor.serve(None)
        time.sleep(0.005)


def test_a_rejoined_worker_equals_its_donor_at_the_transfer() -> None:
    d, j, donor, joiner = _pair()
    d.bank.local_steps([0], 3)
    d.w.state["xhat"].copy_(d.w.params)
    seen: dict[str, Any] = {}
    orig = donor.serve

    def serve(ctx: Any) -> None:  # what the donor has at the moment it hands over
        seen.update(X=d.w.params.clone(), M=d.w.momentum.clone(), step=d.w.step,
                    coll_seq=d.ex.coll_seq, xhat=d.w.state["xhat"].clone())
        orig(ctx)

    donor.serve = serve  # type: ignore[method-assign]
    stop = threading.Event()
    t = threading.Thread(target=_donor_loop, args=(d, donor, stop), daemon=True)
    t.start()
    try:
        assert joiner.receive(lambda: {0, 1}, None, 10.0) == 0
    finally:
        stop.set()
        t.join()
    assert torch.equal(j.w.params, seen["X"]) and torch.equal(j.w.momentum, seen["M"])
    assert j.w.step == seen["step"] > 3 and j.ex.coll_seq == seen["coll_seq"]
    assert torch.equal(j.w.state["xhat"], seen["xhat"])
    assert j.w.state["seq"] == d.w.state["seq"]
    # the donor goes on; the joiner holds copies, not views of what it received
    d.bank.local_steps([0], 1)
    d.w.state["xhat"].add_(1.0)
    assert not torch.equal(j.w.state["xhat"], d.w.state["xhat"])
    assert not torch.equal(j.w.params, d.w.params)
    assert j.w.rng.initial_seed() != d.w.rng.initial_seed()  # its own stream


def test_a_handover_that_is_not_this_models_is_refused_and_nothing_is_copied() -> None:
    d, j, donor, joiner = _pair()
    d.bank.local_steps([0], 2)
    before = j.w.params.clone()
    parts = dict(pack(d))
    parts["model"]["X"] = parts["model"]["X"][:-1]  # a foreign model's size
    joiner.donor, joiner.n = 0, 1
    for name, tree in parts.items():
        joiner.on_hand(0, 1, name, _wire(("hand", 1, name, tree))[3])
    from relaxsgd.distributed.handover import apply

    with pytest.raises(WireError, match="X is not this model's"):
        apply(j, joiner.got)
    assert torch.equal(j.w.params, before) and j.w.step == 0
