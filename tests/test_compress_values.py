"""Every compressor and quantizer pinned by exact values computed by hand.

Tiny inputs whose results can be worked out on paper (the derivation is in the comments),
over several rounds where the compressor carries state (the error-feedback residual,
PowerSGD's warm-started Q, random-k's step counter), in every protocol form it has:
``compress``/``decompress`` and ``mean`` (the all-reduce or all-gather form), run here
for two workers in lockstep. The random draws come from CPU generators seeded in the
test (their first numbers are pinned too), so the same values hold on CUDA: each test runs
on every device present.
"""

from __future__ import annotations

import pytest
import torch

from relaxsgd.algorithms.base import AllGather, AllReduce
from relaxsgd.compress.spec import make_compressor
from relaxsgd.quantize.lattice import LatticeQuantizer
from relaxsgd.quantize.qsgd_diff import QSGDDiffQuantizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.parametrize("dev", DEVICES)

XA = [0.5, -2.0, 1.0, 0.25]  # worker A's vector
XB = [1.5, 0.0, -1.0, 0.75]  # worker B's vector


def t(values: list[float], dev: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=dev)


def same(got: torch.Tensor, want: list[float], dev: str, tol: float = 0.0) -> None:
    assert got.device.type == dev
    torch.testing.assert_close(got.float().cpu(), torch.tensor(want, dtype=torch.float32),
                               rtol=0, atol=tol)


def lockstep(programs: list) -> list:
    """Run the workers' ``mean`` sub-programs together: an all-reduce gives every worker
    the element-wise mean, an all-gather the list of payloads by rank."""
    values: list = [None] * len(programs)
    done: list = [None] * len(programs)
    while True:
        effects = []
        for i, p in enumerate(programs):
            try:
                effects.append(p.send(values[i]))
            except StopIteration as stop:
                done[i] = stop.value
        if all(d is not None for d in done):
            return done
        assert len({type(e) for e in effects}) == 1 and len(effects) == len(programs)
        if isinstance(effects[0], AllReduce):
            many = isinstance(effects[0].tensors, list)
            ts = [e.tensors if many else [e.tensors] for e in effects]
            mean = [torch.stack(col).mean(0) for col in zip(*ts, strict=True)]
            values = [[m.clone() for m in mean] if many else mean[0].clone() for _ in effects]
        else:
            assert isinstance(effects[0], AllGather)
            values = [[e.payload for e in effects] for _ in effects]


def mean_round(c, xs: list[torch.Tensor], states: list, gens: list) -> tuple:
    """One round of ``mean`` on two workers: (means, owns, new states)."""
    out = lockstep([c.mean(x, s, g) for x, s, g in zip(xs, states, gens, strict=True)])
    return [o[0] for o in out], [o[1] for o in out], [o[2] for o in out]


def test_identity(dev: str) -> None:
    c = make_compressor("identity")
    p, _ = c.compress(t(XA, dev), {})
    same(c.decompress(p), XA, dev)
    assert c.nbytes(p) == 16
    means, owns, _ = mean_round(c, [t(XA, dev), t(XB, dev)], [{}, {}], [None, None])
    same(means[0], [1.0, -1.0, 0.0, 0.5], dev)  # (XA + XB) / 2
    same(owns[1], XB, dev)


@pytest.mark.parametrize("name,decoded,bits", [
    # fp16: 10-bit mantissa; 1/3 -> 0x3555 = 0.333251953125; 1001.3 lies between 1001.0
    # and 1001.5 (step 0.5) -> 1001.5; 70000 > 65504 -> inf
    ("fp16", [0.333251953125, 1001.5, float("inf"), -2.5], [0x3555, 0x63D3, 0x7C00, -16128]),
    # bf16: 7-bit mantissa; 1/3 = 0x3EAAAAAB -> 0x3EAB (round up) = 0.333984375; 1001.3
    # (step 4 in [512, 1024)) -> 1000; 70000 (step 512) -> 137 * 512 = 70144 = 0x4789
    ("bf16", [0.333984375, 1000.0, 70144.0, -2.5], [0x3EAB, 0x447A, 0x4789, -16352]),
])
def test_half_precision_casts(dev: str, name: str, decoded: list, bits: list) -> None:
    c = make_compressor(name)
    x = t([1 / 3, 1001.3, 70000.0, -2.5], dev)
    p, _ = c.compress(x, {})
    assert p.view(torch.int16).cpu().tolist() == bits  # the 2-byte pattern that travels
    same(c.decompress(p), decoded, dev)
    assert c.nbytes(p) == 8
    # all-reduce form: the mean of the decoded values
    means, _, _ = mean_round(c, [x, t([0.0, 1.0, 0.0, 0.5], dev)], [{}, {}], [None, None])
    same(means[0][[0, 1, 3]], [decoded[0] / 2, (decoded[1] + 1.0) / 2, -1.0], dev)


def test_qsgd(dev: str) -> None:
    # bits=2: 4 grid points -c, -c/3, c/3, c per bucket of 2; t = (x/c + 1) * 3/2.
    # Bucket [0.5, -1]: c = 1, t = [2.25, 0]; bucket [0.25, 0]: c = 0.25, t = [3, 1.5].
    # Draws u (seed 0) = [0.496, 0.768, 0.088, 0.132]: round t up when u < frac(t):
    # codes [2 (0.496 >= 0.25), 0, 3, 2 (0.132 < 0.5)] -> c * (2 code / 3 - 1).
    c = make_compressor("qsgd:bits=2,bucket=2")
    u = torch.rand(4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(u, torch.tensor([0.49626, 0.76822, 0.08848, 0.13203]),
                               atol=1e-5, rtol=0)
    x = t([0.5, -1.0, 0.25, 0.0], dev)
    p, _ = c.compress(x, {}, torch.Generator().manual_seed(0))
    assert p.codes.cpu().tolist() == [0b10_00_11_10]  # 2-bit codes, big-endian, packed
    same(p.scales, [1.0, 0.25], dev)
    same(c.decompress(p), [1 / 3, -1.0, 0.25, 1 / 12], dev, 1e-7)
    assert c.nbytes(p) == 1 + 2 * 4
    # all-gather form: B's vector lies on its grid (codes 3, 0, 3, 0), so decodes exactly
    xb = t([1.0, -1.0, 0.5, -0.5], dev)
    gens = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(9)]
    means, owns, _ = mean_round(c, [x, xb], [{}, {}], gens)
    same(owns[1], [1.0, -1.0, 0.5, -0.5], dev)
    same(means[0], [2 / 3, -1.0, 0.375, -5 / 24], dev, 1e-7)


def test_topk(dev: str) -> None:
    c = make_compressor("topk:k=2")
    p, _ = c.compress(t(XA, dev), {})
    assert sorted(p.indices.cpu().tolist()) == [1, 2]  # |-2| and |1| are the largest
    same(c.decompress(p), [0.0, -2.0, 1.0, 0.0], dev)
    assert c.nbytes(p) == 2 * (4 + 4)
    means, _, _ = mean_round(c, [t(XA, dev), t(XB, dev)], [{}, {}], [None, None])
    same(means[1], [0.75, -1.0, 0.0, 0.0], dev)  # ([0,-2,1,0] + [1.5,0,-1,0]) / 2


def test_randk(dev: str) -> None:
    # randperm(4) with seed 1 is [1, 3, 2, 0]: k=2 keeps entries 1 and 3
    assert torch.randperm(4, generator=torch.Generator().manual_seed(1)).tolist() == [1, 3, 2, 0]
    c = make_compressor("randk:k=2")
    p, st = c.compress(t(XA, dev), c.init_state(4), torch.Generator().manual_seed(1))
    same(c.decompress(p), [0.0, -2.0, 0.0, 0.25], dev)
    assert st["step"] == 1 and c.nbytes(p) == 16
    scaled = make_compressor("randk:k=2,scale=true")  # times d/k = 2: unbiased
    p, _ = scaled.compress(t(XA, dev), {}, torch.Generator().manual_seed(1))
    same(scaled.decompress(p), [0.0, -4.0, 0.0, 0.5], dev)


def test_randk_with_a_shared_seed_over_rounds(dev: str) -> None:
    # indices from seed (5 * 1_000_003 + step): step 0 -> [1, 3, ..], step 1 -> [0, 1, ..],
    # step 2 -> [1, 3, ..]; every worker keeps the same ones, so the values are all-reduced
    # and the indices do not travel (4 bytes a value)
    c = make_compressor("randk:k=2,shared_seed=5")
    states = [c.init_state(4, None, dev), c.init_state(4, None, dev)]
    want = [[0.0, -1.0, 0.0, 0.5], [1.0, -1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.5]]
    for rnd, w in enumerate(want):
        means, owns, states = mean_round(c, [t(XA, dev), t(XB, dev)], states, [None, None])
        same(means[0], w, dev)
        assert states[0]["step"] == rnd + 1
    p, _ = c.compress(t(XA, dev), {"step": 1})
    same(c.decompress(p), [0.5, -2.0, 0.0, 0.0], dev)
    assert c.nbytes(p) == 8


def test_scaled_sign(dev: str) -> None:
    # scale = ||x||_1 / d = (0.5 + 2 + 1 + 0.25) / 4 = 0.9375; 1 bit a sign, 1 = negative
    c = make_compressor("sign")
    p, _ = c.compress(t(XA, dev), {})
    assert p.signs.cpu().tolist() == [0b0100_0000]
    same(c.decompress(p), [0.9375, -0.9375, 0.9375, 0.9375], dev)
    assert c.nbytes(p) == 1 + 4
    # B: scale 3.25 / 4 = 0.8125, zero sent as +; the all-gather mean of the two
    means, _, _ = mean_round(c, [t(XA, dev), t(XB, dev)], [{}, {}], [None, None])
    same(means[0], [0.875, -0.0625, 0.0625, 0.875], dev)


def test_error_feedback_sign_over_three_rounds(dev: str) -> None:
    # v = x + e; sent = sign(v) ||v||_1 / 4; e = v - sent. Sum of sent + last e = 3 x.
    c = make_compressor("ef(sign)")
    st = c.init_state(4, None, dev)
    want = [([0.9375, -0.9375, 0.9375, 0.9375], [-0.4375, -1.0625, 0.0625, -0.6875]),
            ([1.15625, -1.15625, 1.15625, -1.15625], [-1.09375, -1.90625, -0.09375, 0.71875]),
            ([-1.59375, -1.59375, 1.59375, 1.59375], [1.0, -2.3125, -0.6875, -0.625])]
    for sent, residual in want:
        p, st = c.compress(t(XA, dev), st)
        same(c.decompress(p), sent, dev)
        same(st["residual"], residual, dev)


def test_error_feedback_topk_over_three_rounds_in_both_forms(dev: str) -> None:
    # A: x = [0.5, -2, 1.25, 0.25]; top-1 of v = x + e each round:
    #   v1 = x -> sends -2 (entry 1);   e = [0.5, 0, 1.25, 0.25]
    #   v2 = [1, -2, 2.5, 0.5] -> 2.5;  e = [1, -2, 0, 0.5]
    #   v3 = [1.5, -4, 1.25, 0.75] -> -4; e = [1.5, 0, 1.25, 0.75]
    # B: x = [1.5, 0, -1, 0.75]: sends 1.5 (0), then -2 (2), then 3 (0)
    c = make_compressor("ef(topk:k=1)")
    xa, xb = t([0.5, -2.0, 1.25, 0.25], dev), t(XB, dev)
    sent_a = [[0, -2, 0, 0], [0, 0, 2.5, 0], [0, -4, 0, 0]]
    res_a = [[0.5, 0, 1.25, 0.25], [1, -2, 0, 0.5], [1.5, 0, 1.25, 0.75]]
    st = c.init_state(4, None, dev)
    for sent, res in zip(sent_a, res_a, strict=True):
        p, st = c.compress(xa, st)
        same(c.decompress(p), sent, dev)
        same(st["residual"], res, dev)
    states = [c.init_state(4, None, dev), c.init_state(4, None, dev)]
    means = [[0.75, -1, 0, 0], [0, 0, 0.25, 0], [1.5, -2, 0, 0]]
    for rnd, want in enumerate(means):
        got, owns, states = mean_round(c, [xa, xb], states, [None, None])
        same(got[0], want, dev)
        same(owns[0], sent_a[rnd], dev)
        same(states[0]["residual"], res_a[rnd], dev)
    same(states[1]["residual"], [0, 0, -1, 2.25], dev)


U, V, W = [1.0, 2.0, 2.0], [1.0, 0.0, -1.0], [0.0, 1.0, 0.0]  # |U| = 3


def outer(a: list[float], b: list[float]) -> list[float]:
    return [x * y for x in a for y in b]


LAYOUT = [("w", torch.Size([3, 3])), ("b", torch.Size([2]))]  # rank 1: 6 < 9, compressed


def test_powersgd_warm_start_over_three_rounds(dev: str) -> None:
    # M = U V^T has rank 1: M q = (V.q) U, and P = orth(M q) = -U/3 whatever the sign of
    # V.q (Householder QR: R11 = -sign(a1) |a|, so Q's first entry is always negative);
    # decoded P P^T M = M exactly; the new Q = M^T P = (U.P) V = -3 V, each round (the
    # warm start from q0 = randn(3, 1) of seed 0 = [1.541, -0.293, -2.179], then from -3V).
    # The bias travels as is.
    c = make_compressor("powersgd:rank=1")
    st = c.init_state(11, LAYOUT, dev)
    same(st["q"][0].flatten(), [1.5409961, -0.2934289, -2.1787894], dev, 1e-6)
    x = t(outer(U, V) + [0.5, -0.25], dev)
    for _ in range(3):
        p, st = c.compress(x, st)
        same(p.ps[0].flatten(), [-u / 3 for u in U], dev, 1e-6)
        same(st["q"][0].flatten(), [-3 * v for v in V], dev, 1e-5)
        same(c.decompress(p), outer(U, V) + [0.5, -0.25], dev, 1e-5)
        assert c.nbytes(p) == 4 * (2 + 3 + 3)


def test_powersgd_all_reduce_protocol_over_two_rounds(dev: str) -> None:
    # A: M_a = U V^T, B: M_b = U W^T (same column space). Mean P = U (V.q + W.q) / 2 ->
    # P_hat = -U/3 (as above); Q_a = -3V, Q_b = -3W; the mean P_hat (mean Q)^T =
    # U (V + W)^T / 2 = (M_a + M_b) / 2 exactly; own_a = P_hat Q_a^T = M_a; the warm start
    # of the next round is mean Q = -1.5 (V + W).
    c = make_compressor("powersgd:rank=1")
    xa, xb = t(outer(U, V) + [1.0, 0.0], dev), t(outer(U, W) + [0.0, -1.0], dev)
    mean = [(a + b) / 2 for a, b in zip(outer(U, V), outer(U, W), strict=True)] + [0.5, -0.5]
    states = [c.init_state(11, LAYOUT, dev), c.init_state(11, LAYOUT, dev)]
    for _ in range(2):
        means, owns, states = mean_round(c, [xa, xb], states, [None, None])
        same(means[0], mean, dev, 1e-5)
        same(means[1], mean, dev, 1e-5)
        same(owns[0], outer(U, V) + [1.0, 0.0], dev, 1e-5)
        same(states[0]["q"][0].flatten(), [-1.5 * (v + w) for v, w in zip(V, W, strict=True)],
             dev, 1e-5)


def test_lattice_quantizer(dev: str) -> None:
    # bits=4 (q = 16), eps = 0.25: x on the lattice, r = x / eps = [2, -3, 8, 4], residues
    # z = [2, 13, 8, 4], packed 4 bits each, least significant bit first:
    # byte 0 = 2 | 13 << 4 = 210, byte 1 = 8 | 4 << 4 = 72
    q = LatticeQuantizer(bits=4)
    x = t([0.5, -0.75, 2.0, 1.0], dev)
    p = q.encode(x, eps=0.25, generator=torch.Generator().manual_seed(0))
    assert p.codes.cpu().tolist() == [210, 72] and p.eps == 0.25
    assert q.nbytes(p) == 2 + 4 + 4
    # decoded against a reference within (q/2 - 1) eps = 1.75 of x: the point of each
    # residue class nearest to the reference, x itself
    ref = t([0.0, 0.0, 1.0, 2.0], dev)
    x_hat, ok = q.decode(p, ref)
    same(x_hat, [0.5, -0.75, 2.0, 1.0], dev)
    assert ok
    # a reference 5 away in entry 2: 28 -> nearest 24 of the class of 8 -> 6.0, detected
    x_hat, ok = q.decode(p, t([0.0, 0.0, 7.0, 2.0], dev))
    same(x_hat, [0.5, -0.75, 6.0, 1.0], dev)
    assert not ok
    # off the lattice: 0.3 / 0.25 = 1.2 rounds up with probability 0.2 (u = 0.496: down)
    p = q.encode(t([0.3, 0.0, 0.0, 0.0], dev), eps=0.25,
                 generator=torch.Generator().manual_seed(0))
    same(q.decode(p, t([0.0] * 4, dev))[0], [0.25, 0.0, 0.0, 0.0], dev)


def test_qsgd_difference_quantizer(dev: str) -> None:
    # bits=3: L = 3 levels a sign; d = x - ref = [0.5, -0.25 | 0, 0], buckets of 2:
    # s = 0.5, y = 3 d / s = [3, -1.5]; -1.5 rounds to -1 when u < 0.5: u (seed 0, float64)
    # second draw decides; level + L is sent in 3 bits; decoded ref + s level / L
    q = QSGDDiffQuantizer(bits=3, bucket_size=2)
    u = torch.rand(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = t([1.0, 1.0, -1.0, 0.0], dev)
    x = t([1.5, 0.75, -1.0, 0.0], dev)
    p = q.encode(x, generator=torch.Generator().manual_seed(0), reference=ref)
    level1 = -1 if u[1] < 0.5 else -2
    same(p.scales, [0.5, 0.0], dev)
    x_hat, ok = q.decode(p, ref)
    same(x_hat, [1.5, 1.0 + 0.5 * level1 / 3, -1.0, 0.0], dev, 1e-7)
    assert ok and q.nbytes(p) == 2 + 2 * 4  # 4 codes x 3 bits = 12 bits -> 2 bytes
    codes = [6, level1 + 3, 3, 3]  # level + L, packed least significant bit first
    packed = sum(((c >> k) & 1) << (3 * i + k) for i, c in enumerate(codes) for k in range(3))
    assert p.codes.cpu().tolist() == [packed & 0xFF, packed >> 8]
