"""SwarmSGD's quantizers: lattice decoding, failure detection, unbiasedness, wire size."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from relaxsgd.errors import ConfigError
from relaxsgd.quantize import QUANTIZERS
from relaxsgd.quantize.lattice import (
    LatticeQuantizer,
    checksum,
    choose_eps,
    float_checksum,
    pack_bits,
    unpack_bits,
)
from relaxsgd.quantize.qsgd_diff import QSGDDiffQuantizer

OVERHEAD = 8  # lattice: 4 bytes checksum + 4 bytes eps


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(numel: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference b and a model x with |x - b| <= spread in every coordinate."""
    g = _gen(seed)
    b = torch.randn(numel, generator=g, dtype=torch.float64) * 3
    x = b + (2 * torch.rand(numel, generator=g, dtype=torch.float64) - 1) * spread
    return x, b


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8, 12, 16, 32])
def test_pack_unpack_roundtrip(bits) -> None:
    for numel in (0, 1, 7, 1001):
        v = torch.randint(0, 2 ** bits, (numel,), generator=_gen(bits), dtype=torch.int64)
        packed = pack_bits(v, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(numel * bits / 8)
        assert torch.equal(unpack_bits(packed, bits, numel), v)


def _bits_reference(values: list[int], bits: int) -> list[int]:
    """The wire layout written out: bit k of value i is bit i * bits + k of the stream,
    bit j of the stream is bit j % 8 of byte j // 8 (least significant first)."""
    stream = [(v >> k) & 1 for v in values for k in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return [sum(b << i for i, b in enumerate(stream[j:j + 8])) for j in range(0, len(stream), 8)]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 7, 8, 9, 10, 12, 14, 16, 18, 20, 24, 31, 32])
def test_pack_bits_writes_the_documented_layout(bits) -> None:
    # widths packed a word at a time (g values per int64) and widths packed bit by bit
    for numel in (1, 13, 64):
        v = torch.randint(0, 2 ** bits, (numel,), generator=_gen(bits), dtype=torch.int64)
        v[0] = 2 ** bits - 1  # all ones: a shift or mask off by one shows
        want = _bits_reference(v.tolist(), bits)
        assert pack_bits(v, bits).tolist() == want
        assert torch.equal(unpack_bits(torch.tensor(want, dtype=torch.uint8), bits, numel), v)


def _hash_reference(r: list[int]) -> int:
    """checksum's definition in Python integers: sum_i a_i (r_i mod P) mod P, with a_i the
    documented integer mix of the index i (1-based), nonzero mod P."""
    p, total = 2 ** 31 - 1, 0
    for i, v in enumerate(r, start=1):
        a = (i % p) * 1_103_515_245 % p
        a ^= a >> 15
        a = a * 2_147_483_629 % p
        a ^= a >> 13
        total += (a % (p - 1) + 1) * (v % p)
    return total % p


@pytest.mark.parametrize("scale", [3, 2 ** 20, 2 ** 30, 2 ** 31, 2 ** 45, 2 ** 62])
def test_checksum_is_the_linear_hash_whatever_the_size_of_the_integers(scale) -> None:
    # small integers are hashed in one block, larger ones in blocks of 2^32 // max|r|
    # (2^30: blocks of 4, and a tail), from 2^31 on reduced mod P first
    r = torch.randint(-scale, scale, (203,), generator=_gen(scale % 1000), dtype=torch.int64)
    r[5] = -scale
    assert checksum(r) == _hash_reference(r.tolist())
    ends = torch.tensor([-2 ** 63, 2 ** 63 - 1, 0, -1, 1])
    assert checksum(ends) == _hash_reference(ends.tolist())


@pytest.mark.parametrize("scale", [1, 2 ** 10, 2 ** 28, 2 ** 40])
def test_float_checksum_is_the_checksum_of_the_integers(scale) -> None:
    # two float64 dot products while bound * numel < 2^37, the int64 hash beyond
    r = torch.randint(-scale, scale + 1, (1000,), generator=_gen(7), dtype=torch.int64)
    assert float_checksum(r.to(torch.float64), float(scale)) == _hash_reference(r.tolist())


@pytest.mark.parametrize("bits", [4, 5, 8, 16, 32])
def test_encode_value_is_what_the_receiver_decodes(bits) -> None:
    q = LatticeQuantizer(bits)
    x, b = _pair(3001, 0.5 * (2 ** (bits - 1) - 1) * 1e-3, seed=bits)
    for ref in (x, b):  # the sender's own copy, a receiver inside the radius
        payload, x_hat = q.encode_value(x.to(torch.float32), 1e-3, _gen(1))
        decoded, ok = q.decode(payload, ref.to(torch.float32))
        assert ok and torch.equal(x_hat, decoded) and x_hat.dtype == torch.float32


def test_decode_refuses_codes_that_do_not_match_bits_and_numel() -> None:
    q = LatticeQuantizer(8)
    p = q.encode(torch.zeros(10), 0.1, _gen())
    with pytest.raises(ConfigError, match="codes"):
        q.decode(dataclasses.replace(p, codes=p.codes[:1]), torch.zeros(10))
    with pytest.raises(ConfigError, match="codes"):
        q.decode(dataclasses.replace(p, codes=p.codes.to(torch.int32)), torch.zeros(10))
    with pytest.raises(ConfigError, match="bits"):
        q.decode(dataclasses.replace(p, bits=200), torch.zeros(10))
    with pytest.raises(ConfigError, match="expected a floating-point dtype"):
        q.decode(dataclasses.replace(p, dtype=torch.int64), torch.zeros(10))


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 9, 16])
def test_lattice_decodes_exactly_inside_range(bits) -> None:
    q = LatticeQuantizer(bits)
    eps = 1e-3
    x, b = _pair(4000, spread=(2 ** (bits - 1) - 1) * eps * 0.999, seed=bits)
    payload = q.encode(x, eps, _gen(1))
    x_hat, ok = q.decode(payload, b)
    assert ok and x_hat.dtype == x.dtype and x_hat.shape == x.shape
    assert float((x_hat - x).abs().max()) < payload.eps  # only the rounding remains
    # On the lattice: x_hat / eps are integers, the floor or ceil of x / eps.
    r = x_hat / payload.eps
    torch.testing.assert_close(r, r.round(), rtol=0, atol=1e-6)


def test_lattice_float32_shape_and_dtype_preserved() -> None:
    q = LatticeQuantizer(8)
    b = torch.randn(3, 5, 7, generator=_gen(2))
    x = b + 0.01 * torch.randn(3, 5, 7, generator=_gen(3))
    payload = q.encode(x, choose_eps(0.05, 8), _gen(4))
    x_hat, ok = q.decode(payload, b)
    assert ok and x_hat.dtype == torch.float32 and x_hat.shape == (3, 5, 7)
    assert float((x_hat - x).abs().max()) <= payload.eps * 1.01  # + float32 rounding


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("shift", [0.8, 1.0, 2.3, -3.6])
def test_lattice_reports_failure_beyond_range(bits, shift) -> None:
    q, eps = LatticeQuantizer(bits), 1e-3
    x, b = _pair(500, spread=eps, seed=bits)
    # One coordinate beyond q*eps/2 even after rounding by up to eps (q = 4: 3.2 eps > 3 eps).
    x[17] = b[17] + shift * (2 ** bits) * eps
    x_hat, ok = q.decode(q.encode(x, eps, _gen(5)), b)
    assert not ok  # reported, not raised
    assert abs(float(x_hat[17] - x[17])) > (2 ** bits) * eps / 2  # silently wrong value


def test_lattice_reports_many_failures() -> None:
    q, eps = LatticeQuantizer(4), 1e-2
    x, b = _pair(2000, spread=40 * eps, seed=9)  # beyond the radius 7*eps almost everywhere
    for seed in range(20):
        assert not q.decode(q.encode(x, eps, _gen(seed)), b)[1]


def test_checksum_sees_any_single_multiple_of_q() -> None:
    r = torch.randint(-10**6, 10**6, (257,), generator=_gen(0))
    h = checksum(r)
    for i in (0, 1, 128, 256):
        for delta in (256, -256, 65536, 3 * 2**31):
            wrong = r.clone()
            wrong[i] += delta
            assert checksum(wrong) != h


def test_lattice_stochastic_rounding_is_unbiased() -> None:
    q, eps, draws = LatticeQuantizer(8), 0.01, 20000
    x_row = torch.tensor([0.0, 0.0013, -0.0042, 0.00999, 0.5005, -1.23456], dtype=torch.float64)
    x = x_row.repeat(draws, 1)  # every row is an independent draw of the same vector
    x_hat, ok = q.decode(q.encode(x, eps, _gen(11)), x + 0.3 * eps)
    assert ok
    # Rounding noise per draw is within [-eps, eps] with std <= eps/2: allow 5 sigma.
    tol = 5 * (eps / 2) / math.sqrt(draws)
    torch.testing.assert_close(x_hat.mean(0), x_row, rtol=0, atol=tol)
    assert float(x_hat.std(0)[1]) > 0.1 * eps  # it is random, not round-to-nearest


def test_lattice_same_generator_seed_same_payload() -> None:
    q = LatticeQuantizer(4)
    x, _ = _pair(300, 0.01)
    a, b = q.encode(x, 1e-3, _gen(3)), q.encode(x, 1e-3, _gen(3))
    assert torch.equal(a.codes, b.codes) and a.check == b.check


@pytest.mark.parametrize("bits,numel,code_bytes", [
    (8, 1000, 1000), (4, 1001, 501), (3, 10, 4), (16, 100, 200), (12, 3, 5), (32, 5, 20),
])
def test_lattice_nbytes_is_encoded_size(bits, numel, code_bytes) -> None:
    q = LatticeQuantizer(bits)
    payload = q.encode(torch.randn(numel, generator=_gen(0)), 1e-2, _gen(1))
    assert code_bytes == math.ceil(numel * bits / 8)
    assert payload.codes.numel() * payload.codes.element_size() == code_bytes
    assert q.nbytes(payload) == code_bytes + OVERHEAD


@pytest.mark.parametrize("bits,safety", [(4, 1.0), (8, 4.0), (16, 2.0)])
def test_choose_eps_covers_safety_times_distance(bits, safety) -> None:
    dist = 0.02
    eps = choose_eps(dist, bits, safety)
    assert (2 ** (bits - 1) - 1) * eps == pytest.approx(safety * dist)
    q = LatticeQuantizer(bits, safety=safety)
    x, b = _pair(3000, spread=safety * dist * 0.999, seed=bits)
    assert q.decode(q.encode(x, eps, _gen(2)), b)[1]
    # Without an explicit eps, the quantizer chooses it from the sender's reference guess.
    payload = q.encode(x, generator=_gen(2), reference=x + (b - x) / safety)
    guess = float((b - x).abs().max()) / safety  # what the sender measured
    assert payload.eps == pytest.approx(choose_eps(guess, bits, safety), rel=1e-6)
    assert q.decode(payload, b)[1]


def test_lattice_fixed_eps_and_validation() -> None:
    q = LatticeQuantizer(16, eps=0.0035 / 8)  # the SwarmSGD authors' setting for n = 8
    assert q.eps_for(123.0) == 0.0035 / 8
    assert q.encode(torch.ones(4)).eps == pytest.approx(0.0035 / 8, rel=1e-7)
    with pytest.raises(ConfigError, match="lattice encode needs eps"):
        LatticeQuantizer(8).encode(torch.ones(4))
    with pytest.raises(ConfigError, match="bits must be an integer in 2..32, got 1"):
        LatticeQuantizer(1)
    with pytest.raises(ConfigError, match="eps must be a finite number > 0"):
        LatticeQuantizer(8, eps=-1.0)
    with pytest.raises(ConfigError, match="too small for values of size"):
        LatticeQuantizer(8).encode(torch.tensor([1e6]), 1e-12)
    with pytest.raises(ConfigError, match="reference has 3 values, the payload 4"):
        q.decode(q.encode(torch.ones(4)), torch.ones(3))


def test_qsgd_is_unbiased_and_never_fails() -> None:
    draws, numel = 20000, 6
    ref_row = torch.tensor([0.3, -1.0, 2.0, 0.0, 0.5, 0.25], dtype=torch.float64)
    x_row = ref_row + torch.tensor([0.11, -0.37, 0.0, 0.5, -0.02, 0.013], dtype=torch.float64)
    for norm in ("max", "l2"):
        q = QSGDDiffQuantizer(bits=3, bucket_size=numel, norm=norm)  # one bucket a row
        x, ref = x_row.repeat(draws, 1), ref_row.repeat(draws, 1)
        x_hat, ok = q.decode(q.encode(x, generator=_gen(5), reference=ref), ref)
        assert ok and x_hat.shape == x.shape
        # Per draw the error is below one level step (scale / L <= 0.5 / 3 here).
        tol = 5 * (0.5 / 3) / math.sqrt(draws)
        torch.testing.assert_close(x_hat.mean(0), x_row, rtol=0, atol=tol)


def test_qsgd_error_shrinks_with_bits() -> None:
    x, ref = _pair(5000, spread=0.1, seed=3)
    errors = []
    for bits in (2, 3, 4, 6, 8, 12):
        q = QSGDDiffQuantizer(bits=bits, bucket_size=256)
        x_hat, ok = q.decode(q.encode(x, generator=_gen(bits), reference=ref), ref)
        assert ok
        errors.append(float((x_hat - x).norm()))
    assert all(a > 1.5 * b for a, b in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-3 * float((x - ref).norm())


def test_qsgd_zero_difference_decodes_to_reference() -> None:
    ref = torch.randn(100, generator=_gen(0))
    q = QSGDDiffQuantizer(bits=4, bucket_size=32)
    x_hat, ok = q.decode(q.encode(ref.clone(), generator=_gen(1), reference=ref), ref)
    assert ok and torch.equal(x_hat, ref)


@pytest.mark.parametrize("bits,bucket,numel", [(8, 512, 1000), (4, 100, 1001), (3, 7, 50)])
def test_qsgd_nbytes_is_encoded_size(bits, bucket, numel) -> None:
    q = QSGDDiffQuantizer(bits=bits, bucket_size=bucket)
    x, ref = _pair(numel, 0.1)
    payload = q.encode(x, generator=_gen(0), reference=ref)
    expected = math.ceil(numel * bits / 8) + 4 * math.ceil(numel / bucket)
    assert q.nbytes(payload) == expected
    assert payload.codes.numel() + payload.scales.numel() * payload.scales.element_size() \
        == expected


def test_qsgd_validation() -> None:
    with pytest.raises(ConfigError, match="qsgd encode needs reference"):
        QSGDDiffQuantizer().encode(torch.ones(3))
    with pytest.raises(ConfigError, match="bits must be an integer in 2..16, got 1"):
        QSGDDiffQuantizer(bits=1)
    with pytest.raises(ConfigError, match="norm must be one of max, l2"):
        QSGDDiffQuantizer(norm="l1")


def test_quantizer_registry() -> None:
    assert QUANTIZERS.names() == ["lattice", "qsgd"]
    for entry in QUANTIZERS.entries():
        cls = QUANTIZERS.get(entry.name)
        assert cls.name == entry.name
        assert cls.__doc__.splitlines()[0] == entry.description
