"""Batched gossip: concurrent interactions coded together equal the same ones one by one.

The simulator answers the exchanges that reach distinct workers at the same virtual time
with one ``Algorithm.on_exchange_batch`` call (SwarmSGD codes the lattice requests and
replies of all of them as rows of one matrix: relaxsgd.quantize.lattice_rows). That is a
speed-up only: the models, the codec state, the counters and the bytes must be exactly
those of one ``on_exchange`` call per exchange (Engine.batch_exchanges = False), and the
row math exactly the per-chunk quantizer's.
"""

from __future__ import annotations

import pytest
import torch

import relaxsgd.algorithms.swarm_batch as swarm_batch
from relaxsgd.quantize import lattice_rows as rows
from relaxsgd.quantize.lattice import LatticeQuantizer, draw_offsets
from relaxsgd.run import prepare, simulate
from relaxsgd.sim.engine import Engine
from simkit import tiny

SIZES = (5, 3, 17, 1)


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_lattice_rows_equal_the_quantizer_chunk_by_chunk(bits) -> None:
    g, d = 3, sum(SIZES)
    x = torch.randn(g, d, generator=torch.Generator().manual_seed(1))
    # (a step of 1e-15: |x / eps| near 2^50, where the quantizer rounds by the exact split)
    eps = [[0.013, 0.2, 0.004, 1.5], [0.07, 0.011, 0.3, 0.02], [0.5, 0.5, 1e-15, 0.5]]
    eps = [rows.wire_eps(e) for e in eps]
    # each row's draws at once, as the batch draws them (one generator per worker)
    k = torch.stack([draw_offsets(d, torch.Generator().manual_seed(2 + i), "cpu")
                     for i in range(g)])
    codes, checks, own = rows.encode_rows(x, torch.tensor(eps, dtype=torch.float64), k,
                                          bits, SIZES)
    # a reference near x decodes; one far off (3/4 of the lattice period) does not
    ref = x + 0.3 * torch.tensor(eps, dtype=torch.float64).repeat_interleave(
        torch.tensor(SIZES), 1).float()
    ref[1, 6] += 0.75 * 2 ** bits * eps[1][1]  # chunk 1 of row 1: out of the radius
    got, got_checks = rows.decode_rows(codes, torch.tensor(eps, dtype=torch.float64), ref,
                                       bits, SIZES)
    quant = LatticeQuantizer(bits)
    for i in range(g):
        gen = torch.Generator().manual_seed(2 + i)  # drawn chunk by chunk: the same numbers
        off = 0
        for k, s in enumerate(SIZES):
            part = x[i, off:off + s]
            p = quant.encode(part, eps=eps[i][k], generator=gen)
            assert torch.equal(p.codes, codes[i, off:off + s])
            assert p.check == int(checks[i, k]) and p.eps == eps[i][k]
            assert torch.equal(quant.decode(p, part)[0], own[i, off:off + s])
            value, ok = quant.decode(p, ref[i, off:off + s])
            assert torch.equal(value, got[i, off:off + s])
            assert ok == (int(got_checks[i, k]) == p.check)
            assert ok == ((i, k) != (1, 1))  # only the displaced chunk fails
            off += s


CASES = {
    "default": {},  # lattice 8 bits, adaptive eps, non-blocking, exact mean
    "16-bit, plain mean": {"bits": 16, "exact_mean": False},
    "fixed eps, failing decodes": {"eps": 2e-4, "bits": 8},
    "one tensor": {"per_tensor": False, "overlap": True},
    "blocking (one by one)": {"averaging": "blocking"},
    "qsgd (one by one)": {"quantizer": "qsgd"},
    "codec time charged (one by one)": {},  # compute.codec=on: the engine does not batch
    "two rows a call": {},  # CPU_COORDS set to 2 models: several calls, some of one row
}


def _run(batch: bool, opts: dict, monkeypatch, codec: str = "auto",
         coords: int | None = None) -> tuple:
    monkeypatch.setattr(Engine, "batch_exchanges", batch)
    if coords is not None:
        monkeypatch.setattr(swarm_batch, "CPU_COORDS", coords)
    calls = []
    real = swarm_batch._answer_lattice
    monkeypatch.setattr(swarm_batch, "_answer_lattice",
                        lambda *a: calls.append(len(a[1])) or real(*a))
    out = simulate(prepare(tiny(algo="swarm", algo_options=opts, workers=8, steps=16,
                                network="cloud", train={"momentum": 0.9},
                                compute={"codec": codec})))
    return out, calls


@pytest.mark.parametrize("case", list(CASES))
def test_swarm_batched_answers_equal_one_by_one(case, monkeypatch) -> None:
    opts, codec = CASES[case], "on" if "codec" in case else "auto"
    coords = 2 * 36 if case == "two rows a call" else None  # tiny's logreg: d = 8 * 4 + 4
    if codec == "on":  # the charge changes the run (and below: the batch does not)
        with monkeypatch.context() as m:
            free = _run(True, opts, m)[0].result["final"]["virtual_time_s"]
    a, batched = _run(True, opts, monkeypatch, codec, coords)
    b, single = _run(False, opts, monkeypatch, codec)
    if codec == "on":
        assert a.result["final"]["virtual_time_s"] != free
    if coords:
        assert set(batched) == {2}
    assert (a.engine.exchange_batches > 0) == (codec != "on") and not b.engine.exchange_batches
    coded = "one by one" not in case
    assert (sum(batched) > 0) == coded and not single  # the batched path did run
    # the initiators' requests coded ahead together, and used (not with overlap)
    ahead = coded and not opts.get("overlap")
    assert (a.engine.prefetched > 0) == ahead and not b.engine.prefetched
    hits = [o.engine.algo.codec.prefetch_hits for o in (a, b)]
    assert (hits[0] > 0) == ahead and not hits[1]
    assert torch.equal(a.bank.X, b.bank.X) and torch.equal(a.bank.M, b.bank.M)
    for wa, wb in zip(a.workers, b.workers, strict=True):
        assert wa.counters == wb.counters and wa.obs_sum == wb.obs_sum
        assert wa.obs_count == wb.obs_count
        for key in ("xhat", "acc", "last_sent", "spread", "seq"):
            va, vb = wa.state.get(key), wb.state.get(key)
            assert (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb), key
        assert wa.state["hrng"].get_state().equal(wb.state["hrng"].get_state())
        assert wa.rng.get_state().equal(wb.rng.get_state())
        assert wa.state["pending"].keys() == wb.state["pending"].keys()
    fa = {k: v for k, v in a.result["final"].items() if "wall" not in k}
    fb = {k: v for k, v in b.result["final"].items() if "wall" not in k}
    assert fa == fb
    if "failing" in case:
        assert fa["decode_failures"] > 0  # the resend path was batched too


def _state(w) -> tuple:
    st = w.state
    return (w.rng.get_state(), st["xhat"].clone(), st["last_sent"].clone(),
            None if st["spread"] is None else list(st["spread"]),
            dict(w.obs_sum), dict(w.obs_count))


def _set_state(w, s: tuple) -> None:
    w.rng.set_state(s[0])
    w.state["xhat"].copy_(s[1])
    w.state["last_sent"].copy_(s[2])
    w.state["spread"] = None if s[3] is None else list(s[3])
    w.obs_sum, w.obs_count = dict(s[4]), dict(s[5])


def test_requests_coded_ahead_are_used_only_for_their_exact_inputs() -> None:
    """Requests coded ahead (swarm_prefetch) for 5 workers, then, before each codes its
    request as its program does (partner draw, then encode): worker 0's copy moves (an
    answer), 1's spread changes, 2's generator makes another draw, 3's last_sent moves, 4
    is untouched. Every request, generator and codec state must equal coding with nothing
    kept; only worker 4 may use its kept request."""
    from relaxsgd.devices import draw
    out = simulate(prepare(tiny(algo="swarm", workers=5, steps=8, network="cloud")))
    algo, ws = out.engine.algo, out.workers
    saved = [_state(w) for w in ws]

    def perturb() -> None:
        ws[0].state["xhat"][3] += 1e-3
        ws[1].state["spread"] = [v * 1.5 for v in ws[1].state["spread"]]
        draw(torch.rand, (), generator=ws[2].rng, device="cpu")
        ws[3].state["last_sent"][0] -= 1e-3

    def requests() -> list:
        got = []
        for w in ws:
            peer = int(draw(torch.randint, len(algo.neighbors(w.rank)), (), generator=w.rng,
                            device="cpu"))
            msg, own, nb = algo.codec.encode(w, peer, w.state["xhat"].clone(), w.rng)
            got.append(([(p.codes, p.eps, p.check) for p in msg["data"]], own, nb,
                        _state(w)))
        return got

    assert algo.on_resume_batch(ws, range(5)) == 5
    hits = algo.codec.prefetch_hits
    perturb()
    ahead = requests()
    assert algo.codec.prefetch_hits == hits + 1 and not algo.codec.ready
    for w, s in zip(ws, saved, strict=True):
        _set_state(w, s)
    perturb()
    plain = requests()
    assert algo.codec.prefetch_hits == hits + 1
    for a, b in zip(ahead, plain, strict=True):
        for (ca, ea, ka), (cb, eb, kb) in zip(a[0], b[0], strict=True):
            assert torch.equal(ca, cb) and ea == eb and ka == kb
        assert torch.equal(a[1], b[1]) and a[2] == b[2]
        for x, y in zip(a[3], b[3], strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_adpsgd_answers_in_groups_equal_one_by_one(monkeypatch) -> None:
    # an algorithm without its own batch: the engine's grouping alone must change nothing
    outs = []
    for batch in (True, False):
        monkeypatch.setattr(Engine, "batch_exchanges", batch)
        outs.append(simulate(prepare(tiny(algo="adpsgd", workers=8, steps=16,
                                          network="cloud"))))
    assert outs[0].engine.exchange_batches > 0
    assert torch.equal(outs[0].bank.X, outs[1].bank.X)


@pytest.mark.parametrize("name", ["complete", "ring", "torus", "hypercube", "random-regular",
                                  "exponential"])
def test_neighbour_lists_equal_the_union_of_the_edges(name, monkeypatch) -> None:
    # a static undirected graph reads its adjacency (fast); the union of the edges of every
    # step of the period is the definition
    from relaxsgd.algorithms import swarm_state
    from relaxsgd.topology import base, make_topology
    topo = make_topology(name, 16, seed=3)
    fast = swarm_state.undirected_neighbors(topo, 16)
    monkeypatch.setattr(swarm_state, "UndirectedGraph", type(None))  # the edge loop
    assert fast == swarm_state.undirected_neighbors(topo, 16)
    assert isinstance(topo, base.UndirectedGraph) == (name != "exponential")
