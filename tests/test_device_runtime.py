"""The device of a worker: random draws that do not depend on it, the choice of a process's
device and backend in the distributed runtime, its point-to-point boundary (CUDA payloads
through pinned host memory), and checkpointed state put back on the worker's device.

Without a GPU, ``torch.cuda`` is monkeypatched to stand for machines with 0..4 GPUs, and a
worker on the ``meta`` device stands for one whose tensors are not on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from devicekit import cuda_or_skip
from relaxsgd import devices
from relaxsgd.errors import ConfigError

# -- random draws: one generator on the CPU, the same numbers on every device -----------

def test_draw_gives_the_generators_numbers_on_the_requested_device() -> None:
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = devices.draw(torch.rand, 5, generator=g1, device="cpu")
    b = torch.rand(5, generator=g2)
    assert torch.equal(a, b)
    # drawn on the CPU whatever the target: the generator advances the same way
    assert devices.draw(torch.randperm, 4, generator=g1, device="meta").device.type == "meta"
    devices.draw(torch.randperm, 4, generator=g2, device="cpu")
    assert torch.equal(g1.get_state(), g2.get_state())


# -- device choice of a worker process -----------------------------------------------------

def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("count,requested,local_rank,want", [
    (0, None, 3, "cpu"), (0, "auto", 0, "cpu"), (0, "cpu", 1, "cpu"),
    (2, None, 1, "cuda:1"), (2, "auto", 3, "cuda:1"), (1, "cuda", 1, "cuda:0"),
    (4, "cuda:2", 0, "cuda:2"), (2, "cpu", 1, "cpu"), (2, " CUDA ", 0, "cuda:0"),
])
def test_pick_device(monkeypatch, count, requested, local_rank, want) -> None:
    _gpus(monkeypatch, count)
    assert devices.pick_device(requested, local_rank) == torch.device(want)


@pytest.mark.parametrize("count,requested,fragment", [
    (0, "cuda", "no CUDA device"), (0, "cuda:0", "no CUDA device"),
    (2, "cuda:2", "cuda:0 .. cuda:1"),
    (2, "cuda:x", "cuda:0 .. cuda:1"), (1, "tpu", "unknown"), (1, "", "unknown"),
])
def test_pick_device_refuses_what_the_machine_cannot_serve(monkeypatch, count, requested,
                                                           fragment) -> None:
    _gpus(monkeypatch, count)
    with pytest.raises(ConfigError, match=fragment):
        devices.pick_device(requested, 0)


@pytest.mark.parametrize("count,local_world,shared", [(0, 4, False), (1, 1, False),
                                                      (1, 2, True), (2, 2, False),
                                                      (2, 3, True)])
def test_shares_gpu(monkeypatch, count, local_world, shared) -> None:
    _gpus(monkeypatch, count)
    assert devices.shares_gpu(local_world) is shared


def test_move_and_to_host_keep_values_and_structure() -> None:
    g = torch.Generator()
    state = {"a": [torch.ones(2), (torch.zeros(1), 3)], "g": g, "s": "x"}
    moved = devices.move(state, "meta")
    assert moved["a"][0].device.type == "meta" and moved["a"][1][1] == 3
    assert moved["g"] is g and moved["s"] == "x"
    t = torch.arange(3.0)
    assert devices.to_host(t) is t


def test_a_checkpointed_worker_state_is_put_on_the_workers_device() -> None:
    import types

    from relaxsgd import checkpoint
    from relaxsgd.compress.topk import SparsePayload

    def worker(device: str):
        return types.SimpleNamespace(
            rank=0, params=torch.zeros(3, device=device), rng=torch.Generator(),
            state={"res": torch.ones(3, device=device), "q": [torch.zeros(2, 1, device=device)],
                   "p": SparsePayload(torch.ones(1), torch.zeros(1, dtype=torch.int32), 3)},
            counters={}, obs_sum={}, obs_count={}, samples=0)

    saved = checkpoint.worker_state(worker("cpu"))  # as torch.load(map_location="cpu") gives
    w = worker("meta")
    checkpoint.load_worker_state(w, saved, lambda v: v)
    leaves = [w.state["res"], w.state["q"][0], w.state["p"].values, w.state["p"].indices]
    assert all(t.device.type == "meta" for t in leaves)



# -- the distributed runtime's device choice and its point-to-point boundary --------------

@pytest.mark.parametrize("count,local_world,backend,want", [
    (0, 2, "auto", ("gloo", "cpu")),       # no GPU: every rank on the CPU
    (2, 2, "auto", ("nccl", "cuda:1")),    # a GPU each: NCCL
    (1, 2, "auto", ("gloo", "cuda:0")),    # two ranks, one GPU: shared, gloo
    (3, 4, "gloo", ("gloo", "cuda:1")),    # forced gloo keeps the GPU
])
def test_pick_backend(monkeypatch, count, local_world, backend, want) -> None:
    from relaxsgd.distributed import process
    from relaxsgd.distributed.options import DistOptions

    _gpus(monkeypatch, count)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    got = process.pick_backend(DistOptions(backend=backend), 1, None, local_world)
    assert (got[0], str(got[1])) == want
    assert chosen == ([got[1]] if got[1].type == "cuda" else [])


@pytest.mark.parametrize("count,local_world", [(0, 1), (1, 2)])
def test_nccl_where_it_cannot_work_is_one_line(monkeypatch, count, local_world) -> None:
    from relaxsgd.distributed import process
    from relaxsgd.distributed.options import DistOptions

    _gpus(monkeypatch, count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    with pytest.raises(ConfigError, match="needs a GPU of its own for every rank"):
        process.pick_backend(DistOptions(backend="nccl"), 0, None, local_world)


class _Wire:
    """A transport that records what it is given to send."""

    def __init__(self) -> None:
        self.sent, self.on_dead, self.dead = [], [], {}

    def send(self, peer, msg, done=None) -> None:
        self.sent.append((peer, msg))


def _p2p(device: str):
    import threading
    import types

    from relaxsgd.distributed.p2p import PointToPoint

    p = PointToPoint()
    p.tr, p.lock = _Wire(), threading.RLock()
    p.w = types.SimpleNamespace(params=torch.zeros(4, device=device))
    p.device = torch.device(device)
    p.counts = types.SimpleNamespace(add=lambda *a: None)
    p.opts = types.SimpleNamespace(timeout_s=5.0, peer_timeout_s=5.0)
    p._init_p2p()
    return p


def test_p2p_boundary_sends_host_tensors_and_delivers_on_the_workers_device(
        monkeypatch) -> None:
    from relaxsgd.algorithms.base import Recv, Send
    from relaxsgd.compress.topk import SparsePayload
    from relaxsgd.distributed import p2p

    hosted = []
    monkeypatch.setattr(p2p, "to_host_tree", lambda t: hosted.append(t) or ("host", t))
    payload = SparsePayload(torch.ones(2), torch.tensor([0, 3], dtype=torch.int32), 4)
    w = _p2p("meta")  # a worker whose tensors are not on the CPU
    w._send(Send(1, payload, 8, tag=7))
    assert hosted == [payload] and w.tr.sent[0][1][2] == ("host", payload)
    w.on_message(1, ("msg", 7, payload))  # decoded from the wire: on the CPU
    h = w._recv(Recv(1, tag=7))
    assert h.value.values.device.type == "meta" and h.value.indices.device.type == "meta"
    assert h.value.numel == 4
    cpu = _p2p("cpu")  # a CPU worker: nothing copied
    cpu._send(Send(1, payload, 8))
    assert cpu.tr.sent[0][1][2] is payload and len(hosted) == 1


@pytest.mark.cuda
def test_to_host_copies_cuda_tensors_into_pinned_memory() -> None:
    cuda_or_skip()
    from relaxsgd.compress.topk import SparsePayload

    payload = SparsePayload(torch.ones(2, device="cuda"),
                            torch.tensor([0, 3], dtype=torch.int32, device="cuda"), 4)
    host = devices.to_host_tree(payload)
    assert host.values.device.type == "cpu" and host.values.is_pinned()
    assert torch.equal(devices.move(host, "cuda").dense(), payload.dense())
