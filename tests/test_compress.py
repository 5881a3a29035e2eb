"""Conformance suite for the compressors: every registered name (with its default options)
and a few option variants go through the same invariants (DESIGN.md section 7): shape and
dtype, purity, exact byte counts, error feedback's x + e_old = decoded + e_new, determinism,
unbiasedness over many draws, the summable flag against the `mean` sub-program, and
checkpointable state. A newly registered compressor is picked up automatically (and fails
`hand_nbytes` until someone writes down its byte count by hand).
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from typing import Any

import pytest
import torch

from relaxsgd.algorithms.base import AllGather, AllReduce
from relaxsgd.compress import COMPRESSORS
from relaxsgd.compress.base import Compressor, pack_bits, unpack_bits
from relaxsgd.compress.error_feedback import ErrorFeedback, residual_norm
from relaxsgd.compress.powersgd import PowerSGD
from relaxsgd.compress.randk import RandK
from relaxsgd.compress.spec import make_compressor
from relaxsgd.compress.topk import TopK
from relaxsgd.errors import ConfigError

VARIANTS = ["qsgd:bits=1,bucket=100", "qsgd:bits=3,norm=l2", "topk:k=7",
            "randk:ratio=0.1,scale=true", "randk:ratio=0.1,shared_seed=5",
            "powersgd:rank=1,power_iters=2"]
SPECS = [*COMPRESSORS.names(), *VARIANTS]

# Conv kernel (8x27 as a matrix, compressed), biases, a linear layer (compressed) and a
# matrix too small to gain from low rank (sent as is): 640 elements.
LAYOUT = [("conv.w", torch.Size([8, 3, 3, 3])), ("conv.b", torch.Size([8])),
          ("fc.w", torch.Size([10, 40])), ("fc.b", torch.Size([10])),
          ("tiny.w", torch.Size([2, 3]))]
INPUTS = {"n3": (3, None), "n777": (777, None), "n1000": (1000, None),
          "layout": (640, LAYOUT)}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_nbytes(c: Compressor, n: int, layout: list | None) -> int:
    """The wire size written down independently of the implementation."""
    if isinstance(c, ErrorFeedback):
        c = c.inner
    k_of = (lambda: min(n, c.k) if c.k is not None
            else max(1, min(n, math.ceil(Fraction(str(c.ratio)) * n))))
    if c.name == "identity":
        return 4 * n
    if c.name in ("fp16", "bf16"):
        return 2 * n
    if c.name == "qsgd":
        return math.ceil(n * c.bits / 8) + 4 * math.ceil(n / c.bucket)
    if c.name == "topk":
        return 8 * k_of()
    if c.name == "randk":
        return (4 if c.shared_seed is not None else 8) * k_of()
    if c.name == "sign":
        return math.ceil(n / 8) + 4
    if c.name == "powersgd":
        total = 0
        for _, shape in layout or [("flat", torch.Size([n]))]:
            rows, cols = (shape[0], shape.numel() // shape[0]) if len(shape) >= 2 else (0, 0)
            low = c.rank * (rows + cols)
            total += 4 * (low if rows and low < rows * cols else shape.numel())
        return total
    pytest.fail(f"no hand count of the wire size of compressor {c.name!r}: add one here")


def clone_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    return state


def assert_same_state(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            assert_same_state(u, v)
    else:
        assert a == b


def run_lockstep(programs: list) -> tuple[list, list]:
    """A tiny runtime: n worker sub-programs in lockstep; AllReduce -> mean, AllGather ->
    list by rank. Returns (the programs' return values, the effects of each round)."""
    replies: list[Any] = [None] * len(programs)
    rounds = []
    while True:
        effects, done = [], []
        for prog, reply in zip(programs, replies, strict=True):
            try:
                effects.append(prog.send(reply))
            except StopIteration as stop:
                done.append(stop.value)
        if done:
            assert len(done) == len(programs), "workers left the protocol at different rounds"
            return done, rounds
        assert len({type(e) for e in effects}) == 1, "workers yielded different effects"
        if isinstance(effects[0], AllReduce):
            mean = torch.stack([e.tensors for e in effects]).mean(0)
            replies = [mean.clone() for _ in programs]
        elif isinstance(effects[0], AllGather):
            replies = [[e.payload for e in effects] for _ in programs]
        else:
            pytest.fail(f"unexpected effect {effects[0]!r}")
        rounds.append(effects)


def assert_unbiased(c: Compressor, x: torch.Tensor, draws: int = 4000) -> None:
    """||mean of draws - x||^2 must be within twice its expectation sum(var)/draws."""
    g, state = gen(3), c.init_state(x.numel())
    out = torch.empty(draws, x.numel())
    for i in range(draws):
        payload, state = c.compress(x, state, g)
        out[i] = c.decompress(payload)
    err2 = float((out.double().mean(0) - x.double()).pow(2).sum())
    expected = float(out.double().var(0).sum()) / draws
    assert err2 <= 2.0 * expected + 1e-10, f"{c.spec}: bias {err2:.3g} vs noise {expected:.3g}"


# --- conformance ---------------------------------------------------------------------------

@pytest.mark.parametrize("inp", INPUTS)
@pytest.mark.parametrize("spec", SPECS)
def test_roundtrip_is_pure_and_counted(spec: str, inp: str) -> None:
    n, layout = INPUTS[inp]
    c = make_compressor(spec)
    x = torch.randn(n, generator=gen(1))
    x0 = x.clone()
    state = c.init_state(n, layout)
    state0 = clone_state(state)
    payload, _ = c.compress(x, state, gen(2))
    assert torch.equal(x, x0), "compress wrote into its input"
    assert_same_state(state, state0)
    y = c.decompress(payload)
    assert y.shape == (n,) and y.dtype == torch.float32
    x.add_(1.0)  # the payload must not alias x
    assert torch.equal(c.decompress(payload), y)
    assert c.nbytes(payload) == hand_nbytes(c, n, layout)
    if n >= 100:
        assert c.nbytes(payload) <= 4 * n


@pytest.mark.parametrize("inp", ["n3", "n777", "layout"])
@pytest.mark.parametrize("spec", SPECS)
def test_error_feedback_keeps_everything(spec: str, inp: str) -> None:
    n, layout = INPUTS[inp]
    ef = ErrorFeedback(make_compressor(spec))
    state, g = ef.init_state(n, layout), gen(4)
    assert residual_norm(state) == 0.0
    for step in range(3):
        x = torch.randn(n, generator=gen(10 + step))
        e_old = state["residual"]
        payload, state = ef.compress(x, state, g)
        torch.testing.assert_close(x + e_old, ef.decompress(payload) + state["residual"],
                                   atol=1e-5, rtol=1e-5)
        assert ef.nbytes(payload) == hand_nbytes(ef, n, layout)
    assert ef.residual_norm(state) == pytest.approx(float(state["residual"].norm()))


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_result(spec: str) -> None:
    def run() -> list[torch.Tensor]:
        c = make_compressor(spec)
        state, g, out = c.init_state(640, LAYOUT), gen(5), []
        for step in range(3):
            payload, state = c.compress(torch.randn(640, generator=gen(step)), state, g)
            out.append(c.decompress(payload))
        return out

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("spec", [s for s in SPECS if make_compressor(s).unbiased])
def test_unbiased_over_many_draws(spec: str) -> None:
    # 257: not a multiple of any bucket size.
    assert_unbiased(make_compressor(spec), torch.randn(257, generator=gen(6)))


def test_biased_ones_are_not_flagged_and_the_check_sees_it() -> None:
    for spec in ("topk", "sign", "fp16", "bf16", "powersgd", "randk", "ef(qsgd)"):
        assert not make_compressor(spec).unbiased, spec
    with pytest.raises(AssertionError, match="bias"):
        assert_unbiased(TopK(ratio=0.1), torch.randn(257, generator=gen(6)), draws=50)
    with pytest.raises(AssertionError, match="bias"):  # unscaled random-k shrinks by k/d
        assert_unbiased(RandK(ratio=0.5), torch.randn(257, generator=gen(6)), draws=400)


@pytest.mark.parametrize("ef", [False, True])
@pytest.mark.parametrize("spec", SPECS)
def test_mean_subprogram_matches_the_summable_flag(spec: str, ef: bool) -> None:
    c = make_compressor(f"ef({spec})" if ef else spec)
    xs = [torch.randn(640, generator=gen(20 + i)) for i in range(3)]
    states = [c.init_state(640, LAYOUT) for _ in xs]
    if ef:  # a non-zero residual to carry
        pairs = enumerate(zip(xs, states, strict=True))
        states = [c.compress(x, s, gen(i))[1] for i, (x, s) in pairs]
    e_old = [s["residual"] if ef else torch.zeros(640) for s in states]
    progs = [c.mean(x, s, gen(30 + i)) for i, (x, s) in enumerate(zip(xs, states, strict=True))]
    results, rounds = run_lockstep(progs)
    kinds = [type(r[0]) for r in rounds]
    sent = sum(r[0].nbytes for r in rounds)
    assert sent == hand_nbytes(c, 640, LAYOUT)
    if isinstance(c.inner if ef else c, PowerSGD):
        assert kinds == [AllReduce, AllReduce]
    else:
        assert kinds == ([AllReduce] if c.summable else [AllGather])
        own_mean = torch.stack([own for _, own, _ in results]).mean(0)
        torch.testing.assert_close(results[0][0], own_mean)
    for (mean, own, state), x, e in zip(results, xs, e_old, strict=True):
        torch.testing.assert_close(mean, results[0][0], rtol=0, atol=0)
        assert own.shape == mean.shape == (640,)
        if ef:
            torch.testing.assert_close(x + e, own + state["residual"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_state_survives_a_checkpoint(spec: str) -> None:
    c = make_compressor(f"ef({spec})")
    state = c.compress(torch.randn(640, generator=gen(1)), c.init_state(640, LAYOUT), gen(2))[1]
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(640, generator=gen(3))
    a, b = c.compress(x, state, gen(4)), c.compress(x, loaded, gen(4))
    assert torch.equal(c.decompress(a[0]), c.decompress(b[0]))
    assert_same_state(a[1], b[1])


# --- specific compressors ------------------------------------------------------------------

def test_identity_mean_is_the_exact_mean() -> None:
    c = make_compressor("identity")
    xs = [torch.randn(100, generator=gen(i)) for i in range(4)]
    results, rounds = run_lockstep([c.mean(x, c.init_state(100)) for x in xs])
    assert torch.equal(results[2][0], torch.stack(xs).mean(0))
    assert rounds[0][0].nbytes == 400


def low_rank_state(rank: int, seeds: range, shared_u: bool) -> list[torch.Tensor]:
    """Vectors in LAYOUT whose matrices have rank `rank` (sharing U across seeds if asked)."""
    out = []
    for s in seeds:
        parts = []
        for _, shape in LAYOUT:
            if len(shape) >= 2:
                rows, cols = shape[0], shape.numel() // shape[0]
                u = torch.randn(rows, rank, generator=gen(99 if shared_u else s))
                parts.append((u @ torch.randn(rank, cols, generator=gen(1000 + s))).flatten())
            else:
                parts.append(torch.randn(shape.numel(), generator=gen(2000 + s)))
        out.append(torch.cat(parts))
    return out


def test_powersgd_is_exact_on_rank_r_matrices() -> None:
    for rank in (1, 2):
        c = PowerSGD(rank=rank)
        x = low_rank_state(rank, range(1), shared_u=False)[0]
        payload, _ = c.compress(x, c.init_state(640, LAYOUT))
        torch.testing.assert_close(c.decompress(payload), x, atol=1e-4, rtol=1e-4)
    c = PowerSGD(rank=1)  # a rank-2 matrix does not survive rank 1
    x = low_rank_state(2, range(1), shared_u=False)[0]
    payload, _ = c.compress(x, c.init_state(640, LAYOUT))
    assert float((c.decompress(payload) - x).norm()) > 1e-2 * float(x.norm())


def test_powersgd_warm_start_converges_to_the_best_rank_r() -> None:
    c = PowerSGD(rank=2)
    m = torch.randn(20, 30, generator=gen(7))
    layout = [("w", torch.Size([20, 30]))]
    state, errs = c.init_state(600, layout), []
    for _ in range(40):
        payload, state = c.compress(m.flatten(), state)
        errs.append(float((c.decompress(payload) - m.flatten()).norm()))
    s = torch.linalg.svdvals(m)
    best = float(s[2:].norm())
    assert errs[-1] == pytest.approx(best, rel=1e-3)
    assert errs[0] > errs[-1]


def test_powersgd_mean_of_low_rank_matrices_is_exact() -> None:
    c = PowerSGD(rank=2)
    xs = low_rank_state(2, range(3), shared_u=True)  # their mean has rank 2 too
    states = [c.init_state(640, LAYOUT) for _ in xs]
    results, rounds = run_lockstep([c.mean(x, s) for x, s in zip(xs, states, strict=True)])
    torch.testing.assert_close(results[0][0], torch.stack(xs).mean(0), atol=1e-4, rtol=1e-4)
    for (_, own, _), x in zip(results, xs, strict=True):  # own = P_hat Q_i^T = M_i here
        torch.testing.assert_close(own, x, atol=1e-4, rtol=1e-4)
    # one buffer: P of each compressed matrix + the uncompressed entries; then the Qs
    assert rounds[0][0].nbytes == 4 * (2 * 8 + 2 * 10 + 8 + 10 + 6)
    assert rounds[1][0].nbytes == 4 * (2 * 27 + 2 * 40)
    for _, _, state in results:  # the warm start stays identical on every worker
        assert_same_state(state["q"], results[0][2]["q"])


def test_powersgd_layout_must_match() -> None:
    with pytest.raises(ConfigError, match="layout"):
        PowerSGD().init_state(641, LAYOUT)


def test_randk_shared_seed_shares_indices_per_step() -> None:
    c = RandK(ratio=0.1, shared_seed=3)
    assert c.summable and not RandK(ratio=0.1).summable
    s = c.init_state(500)
    a, sa = c.compress(torch.randn(500, generator=gen(1)), s, gen(1))
    b, _ = c.compress(torch.randn(500, generator=gen(2)), s, gen(2))
    a2, _ = c.compress(torch.randn(500), sa, gen(1))
    assert torch.equal(a.indices, b.indices)
    assert not torch.equal(a.indices, a2.indices)


def test_topk_keeps_the_largest() -> None:
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3])
    y = TopK(k=2).decompress(TopK(k=2).compress(x, {})[0])
    assert torch.equal(y, torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0]))


@pytest.mark.parametrize("count", [0, 1001, (1 << 18) + 5])  # the last crosses a chunk
@pytest.mark.parametrize("bits", [1, 3, 8, 11, 16])
def test_bit_packing_roundtrip(bits: int, count: int) -> None:
    codes = torch.randint(0, 2**bits, (count,), generator=gen(bits))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


# --- specs and registry --------------------------------------------------------------------

@pytest.mark.parametrize("spec", [*SPECS, "ef(topk:ratio=0.05)"])
def test_spec_round_trip(spec: str) -> None:
    c = make_compressor(spec)
    assert make_compressor(c.spec).spec == c.spec


def test_spec_forms() -> None:
    q = make_compressor(" qsgd: bits=4 , bucket=256 ")
    assert (q.bits, q.bucket) == (4, 256)
    assert make_compressor("topk:k=100").k == 100
    assert make_compressor("powersgd:rank=2").rank == 2
    for s in ("ef(topk:ratio=0.01)", "ef:topk:ratio=0.01"):
        c = make_compressor(s)
        assert isinstance(c, ErrorFeedback) and c.inner.ratio == 0.01
        assert c.spec == "ef(topk)"
    assert make_compressor("ef(topk:ratio=0.05)").spec == "ef(topk:ratio=0.05)"
    assert make_compressor("randk:scale=true").unbiased


@pytest.mark.parametrize("spec, message", [
    ("nope", "choose one of: identity, fp16"),
    ("topk:foo=1", "its options: ratio, k"),
    ("sign:bits=1", "no options"),
    ("topk:ratio=0", r"outside \(0, 1\]"),
    ("randk:ratio=1.5", r"outside \(0, 1\]"),
    ("topk:k=0", "positive integer"),
    ("qsgd:bits=0", "1..16"),
    ("qsgd:bits=four", "not a valid int"),
    ("qsgd:norm=l1", "norm=max or norm=l2"),
    ("powersgd:rank=0", r"powersgd: rank \(e.g. rank=2\) must be an integer >= 1, got 0"),
    ("topk:ratio", "key=value"),
    ("topk:ratio=0.1,ratio=0.2", "twice"),
    ("ef(topk", r"ef\(<spec>\)"),
    ("ef", r"ef\(<spec>\)"),
])
def test_spec_errors_are_one_clear_line(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        make_compressor(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", COMPRESSORS.names())
def test_registry_entries_describe_their_class(name: str) -> None:
    cls = COMPRESSORS.get(name)
    assert cls.name == name
    assert COMPRESSORS.entry(name).description == cls.__doc__.strip().splitlines()[0]
    assert isinstance(make_compressor(name), Compressor)
