"""The lattice codec's stochastic rounding ``floor(y + k 2^-31)`` and its cheap passes.

Invariants (relaxsgd.quantize.lattice): ``r`` is ``floor(y)`` or ``floor(y) + 1``,
rounded up with probability the fraction to within ``2^-31`` (both forms: the fast one
below ``|y| = 2^21``, the exact split beyond); the draws are 31-bit integers from the
caller's generator; the
checksum folded with a power-of-two scale is the integers' checksum; the int32 and int64
paths of the codes and the decoder give the same integers.
"""

from __future__ import annotations

import pytest
import torch

from relaxsgd.quantize.lattice import (
    UNIT,
    LatticeQuantizer,
    checksum,
    draw_offsets,
    float_checksum,
    round_stochastic_,
)

STEP = 2.0 ** -7  # a float32 step: x = y * STEP is exact, so y = x / eps is known exactly
# y values (units of the step): fraction 0, quarters, tiny and near-1 fractions, negative;
# then the same past 2^21 (the exact form), past int32 (int64 codes), up to 2^51
SMALL = [0.0, 3.25, -3.25, 0.5, -2.0 ** -9, 100.75, 0.96875, 2.0 ** 20 + 0.125]
LARGE = [2.0 ** 50 + 3, 2.0 ** 31 + 0.5, -(2.0 ** 40) - 0.25, 2.0 ** 51 + 0.5,
         -(2.0 ** 21) - 0.75, 2.0 ** 22 + 2.0 ** -28]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("classes", [SMALL, LARGE], ids=["fast", "exact"])
def test_rounding_goes_up_with_probability_the_fraction(classes) -> None:
    q, draws = LatticeQuantizer(32), 20000
    y = torch.tensor(classes, dtype=torch.float64)
    x = (y * STEP).repeat(draws)  # every block of len(CLASSES) is an independent draw
    payload, x_hat = q.encode_value(x, STEP, _gen(3))
    r = (x_hat / STEP).view(draws, -1)  # exact: x_hat is float64 here
    low = torch.floor(y)
    assert torch.equal(r, r.round())  # integers
    assert bool(((r == low) | (r == low + 1)).all())  # r - y in (-1, 1)
    up = (r - low).mean(0)  # the estimated probability of rounding up
    frac = y - low
    se = torch.sqrt(frac * (1 - frac) / draws)
    assert bool(((up - frac).abs() <= 5 * se + 2.0 ** -31).all()), (up - frac).tolist()
    assert float(up[0]) == 0.0  # an integer y is sent as it is
    # codes, checksum and x_hat are the same integers; the receiver decodes them
    assert payload.check == checksum(r.reshape(-1).to(torch.int64))
    assert torch.equal(payload.codes, r.reshape(-1).to(torch.int64).to(torch.int32))
    decoded, ok = q.decode(payload, x)
    assert ok and torch.equal(decoded, x_hat)


CASES = ((0.0, 1), (5.0, 3 << 29), (-7.0, (1 << 31) - 1), (2.0 ** 20, 12345))


@pytest.mark.parametrize("size,cases", [
    (2.0 ** 20, CASES),  # the fast form
    (2.0 ** 51, CASES + ((2.0 ** 40, 3 << 19), (-(2.0 ** 45), 1 << 24))),  # the exact split
], ids=["fast", "exact"])
def test_the_draw_resolves_the_fraction_to_2_pow_minus_31(size, cases) -> None:
    # y = n + j 2^-31 goes up exactly for the j largest k: P(up) = j 2^-31, no bias at all
    for n, j in cases:
        y = n + j * UNIT
        edge = (1 << 31) - j  # the smallest k that rounds up
        k = torch.tensor([0, edge - 1, edge, (1 << 31) - 1], dtype=torch.int32)
        r = round_stochastic_(torch.full((4,), y, dtype=torch.float64), k, size)
        assert r.tolist() == [n, n, n + 1, n + 1], (n, j, r.tolist())


def test_draws_are_31_bit_integers_from_the_generator() -> None:
    a = draw_offsets(100_000, _gen(1), "cpu")
    assert a.dtype == torch.int32 and int(a.min()) >= 0
    assert int(a.max()) >= (1 << 31) - (1 << 20)  # the top bit of 31 is drawn
    assert abs(float(a.double().mean()) * UNIT - 0.5) < 0.005  # uniform over [0, 2^31)
    g = _gen(1)  # the same numbers, drawn in two parts (the simulator's batch and a message)
    assert torch.equal(a, torch.cat([draw_offsets(30_001, g, "cpu"),
                                     draw_offsets(69_999, g, "cpu")]))
    assert not torch.equal(a, draw_offsets(100_000, _gen(2), "cpu"))


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_scaled_float_checksum_is_the_checksum_of_the_integers(bits) -> None:
    q = 1 << bits  # the decoder's r / q, folded back by scale = q
    r = torch.randint(-(2 ** 30), 2 ** 30, (999,), generator=_gen(bits), dtype=torch.int64)
    want = checksum(r)
    assert float_checksum(r.to(torch.float64) / q, 2.0 ** 30, scale=q) == want
    assert float_checksum(r.to(torch.float64) / q, 2.0 ** 52, scale=q) == want  # int64 path


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_far_values_take_the_int64_paths_to_the_same_integers(bits) -> None:
    # |y| past 2^31 (codes through int64) and near 2^52 (the decoder's bound passes 2^52:
    # r is rebuilt in int64): the same integers, the same failure detection
    q = LatticeQuantizer(bits)
    x = torch.tensor([2.0 ** 52 - 64, -(2.0 ** 50) - 7, 5.0, 2.0 ** 33 + 1], dtype=torch.float64)
    payload, x_hat = q.encode_value(x, 1.0, _gen(0))
    assert torch.equal(x_hat, x)  # integers are sent as they are
    assert payload.check == checksum(x.to(torch.int64))
    decoded, ok = q.decode(payload, x + 0.3)
    assert ok and torch.equal(decoded, x_hat)
    far = x + 0.3
    far[2] += 0.75 * 2 ** bits  # out of the decode radius
    wrong, ok = q.decode(payload, far)
    assert not ok and torch.equal(wrong[[0, 1, 3]], x_hat[[0, 1, 3]])
    assert float(wrong[2] - x[2]) == 2 ** bits
