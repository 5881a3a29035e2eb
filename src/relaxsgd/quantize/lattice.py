"""Lattice (modular) quantization decoded against the receiver's own reference.

Davies, Gurunathan, Moshrefi, Ashkboos, Alistarh, "New Bounds for Distributed Mean
Estimation and Variance Reduction", ICLR 2021; used by SwarmSGD (Nadiradze et al.,
NeurIPS 2021) to send models that are close to the receiver's in few bits.

Encode (sender, model ``x``): ``r = round_stochastic(x / eps)`` (unbiased: ``E[r eps] =
x``), ``z = r mod q`` with ``q = 2^bits``; only ``z`` travels, ``bits`` bits a coordinate.
Decode (receiver, its own model ``b``): ``xq = q eps round((b - z eps) / (q eps)) + z eps``,
the point of the residue class nearest to ``b``. That is exactly ``r eps`` when
``|r eps - b| < q eps / 2`` in every coordinate, which ``|x - b| <= (q/2 - 1) eps``
guarantees; beyond that a coordinate silently decodes ``q eps`` (or a multiple) away.

Failure detection: the sender also sends a 4-byte checksum of the integer vector ``r``, a
random linear hash mod the prime ``2^31 - 1``; the receiver hashes the integers it decoded.
A wrong decode differs from ``r`` by nonzero multiples of ``q`` and, for a single wrong
coordinate, always changes the hash (the coefficients are nonzero mod a prime); for several,
a collision has probability about ``2^-31``. :meth:`LatticeQuantizer.decode` reports the
outcome as a flag and never raises on it; the caller falls back (SwarmSGD: a full-precision
exchange) and counts failures.

Wire format, counted by :meth:`LatticeQuantizer.nbytes`: the codes, ``ceil(numel * bits /
8)`` bytes (bits 8, 16, 32 as uint8 / int16 / int32 holding the bit pattern; any other
width bit-packed into uint8), plus 4 bytes of checksum and 4 bytes of ``eps`` (float32;
the sender rounds ``eps`` to float32 itself so both sides use the same value). ``numel``,
shape and dtype are known to both sides (the model's layout) and are not counted.

Cost: the codec is SwarmSGD's CPU time per exchange (2.9 ms of a 32.5 ms step per process
on the MNIST CNN, 4 gloo processes on 2 cores), so each side makes one float64 buffer and
few passes: the rounding is ``floor(y + k 2^-31)`` with 31-bit random integers
(:func:`round_stochastic_`, unbiased to ``2^-31`` of a step), codes go through int32, the
checksum is two float64 dot products (:func:`float_checksum`) and ``x_hat`` is written
straight into the model's dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import require_int
from ..codec_meter import metered
from ..devices import draw
from ..errors import ConfigError
from .bitpack import pack_bits as pack_bits  # (re-exported: the lattice's wire form)
from .bitpack import unpack_bits as unpack_bits

_P = (1 << 31) - 1  # Mersenne prime modulus of the checksum
_NATIVE = {8: torch.uint8, 16: torch.int16, 32: torch.int32}
CHECK_BYTES = 4
EPS_BYTES = 4


UNIT = 2.0 ** -31  # the resolution of the stochastic rounding's uniform draw


def _random_int32(numel: int, *, generator: torch.Generator | None,
                  device: torch.device) -> Tensor:
    return torch.empty(numel, dtype=torch.int32, device=device).random_(generator=generator)


def draw_offsets(numel: int, generator: torch.Generator | None,
                 device: torch.device | str) -> Tensor:
    """The stochastic rounding's draw: ``numel`` int32 ``k`` uniform in ``[0, 2^31)``, made
    from ``generator`` on its device and copied to ``device`` (:func:`~relaxsgd.devices.draw`;
    the cheapest numbers torch draws: one 32-bit word of the generator each, against two
    for a float64). Drawing ``a + b`` of them at once gives the same numbers as ``a`` then
    ``b`` (the simulator's batch draws a whole row, one message its chunks one by one)."""
    return draw(_random_int32, numel, generator=generator, device=device)


def round_stochastic_(y: Tensor, k: Tensor, size: float) -> Tensor:
    """Stochastic rounding of float64 ``y`` (``max |y| = size``, below ``2^52``) with the
    draws ``k`` of :func:`draw_offsets`, in place: ``r = floor(y)`` or ``floor(y) + 1``, up
    with probability ``frac(y)`` to within ``2^-31`` (the draw's resolution), so ``|E[r] -
    y| <= 2^-31``.

    ``size < 2^21``: ``floor(y + k 2^-31)``, two passes and no temporary. The float64 sum
    is exact or rounds by at most ``2^-32``, so it cannot reach ``floor(y) + 2`` and
    crosses ``floor(y) + 1`` for at most one value of ``k``. Beyond (where float64 resolves
    ``y`` more coarsely than the draw, and the sum could move the result by more), the
    decision ``frac(y) >= 1 - k 2^-31`` is computed exactly from the split ``y = floor(y) +
    frac(y)``, with two temporaries."""
    if size < 2.0 ** 21:
        return y.add_(k, alpha=UNIT).floor_()
    low = torch.floor(y)
    threshold = k.to(torch.float64).mul_(-UNIT).add_(1.0)  # 1 - k 2^-31, exact
    return low.add_(y.sub_(low).ge_(threshold))


@functools.lru_cache(maxsize=64)
def _coefficients(numel: int, device: torch.device) -> Tensor:
    """The hash coefficients of indices 1..numel: pure, so cached per length and device (the
    encode and decode of every exchange hash vectors of the same few lengths; recomputing
    them was 60% of a SwarmSGD simulation's time)."""
    i = torch.arange(1, numel + 1, dtype=torch.int64, device=device) % _P
    a = (i * 1_103_515_245) % _P
    a = a ^ (a >> 15)
    a = (a * 2_147_483_629) % _P
    a = a ^ (a >> 13)
    return a % (_P - 1) + 1  # nonzero mod P: a single wrong coordinate always shows


def checksum(r: Tensor) -> int:
    """Random linear hash of an int64 vector mod ``2^31 - 1`` (deterministic, shared):
    ``sum_i a_i r_i mod P``.

    The coefficient of index ``i`` comes from a fixed integer mix of ``i``. The sum is
    linear, so ``r`` need not be reduced mod ``P`` first when its products cannot overflow:
    with ``|r_i| <= R < 2^31`` every ``a_i r_i`` is below ``2^62`` in size, and blocks of
    ``2^32 // R`` of them sum below ``2^63`` (the whole vector in one block for the values a
    lattice codes, ``R`` in the thousands). Larger values are reduced mod ``P`` first (the
    same number: the hash is a function of ``r mod P``).
    """
    flat = r.reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0
    lo, hi = (int(v) for v in torch.aminmax(flat))
    bound = max(-lo, hi, 1)
    coef = _coefficients(n, r.device)
    if bound >= 1 << 31:  # products could overflow: reduce mod P first
        flat, bound = torch.remainder(flat, _P), _P - 1
    terms = flat * coef
    block = (1 << 32) // bound  # sum of a block < block * bound * 2^31 <= 2^63
    if block >= n:
        return int(terms.sum()) % _P
    whole = n - n % block
    sums = terms[:whole].view(-1, block).sum(1) % _P  # each < P; fewer than 2^32 of them
    return (int(sums.sum()) + int(terms[whole:].sum())) % _P


@functools.lru_cache(maxsize=64)
def _coefficient_halves(numel: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The coefficients as float64 ``(a >> 16, a & 0xFFFF)``, for :func:`float_checksum`."""
    a = _coefficients(numel, device)
    return (a >> 16).to(torch.float64), (a & 0xFFFF).to(torch.float64)


def float_checksum(r: Tensor, bound: float, scale: float = 1.0) -> int:
    """:func:`checksum` of the integers held exactly in float64 ``r * scale`` (``scale`` a
    power of two, ``|r_i * scale| <= bound``) by two float64 dot products with the 15- and
    16-bit halves of the coefficients: every product and partial sum is an integer (over
    ``scale``) below ``bound * numel * 2^16``, exact in float64 (in any summation order)
    while that is below ``2^53``. Beyond it (or at NaN) the integers are hashed as int64 by
    :func:`checksum`. Same value either way."""
    flat = r.reshape(-1)
    n = flat.numel()
    if not bound * max(n, 1) < 2.0 ** 37:  # (also false at NaN)
        return checksum((flat * scale).to(torch.int64))
    hi, lo = _coefficient_halves(n, r.device)
    high, low = float(torch.dot(flat, hi)) * scale, float(torch.dot(flat, lo)) * scale
    return (int(high) * 65536 + int(low)) % _P


def max_abs(t: Tensor) -> float:
    """``max |t|`` in one pass without a temporary (NaN if any value is NaN)."""
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t.detach())
    return max(-float(lo), float(hi))


def choose_eps(distance_estimate: float, bits: int, safety: float = 4.0) -> float:
    """The lattice step so that decoding is guaranteed up to ``safety * distance_estimate``.

    ``distance_estimate`` is the expected ``max_i |x_i - b_i|`` between the sent model and
    the receiver's (e.g. the largest coordinate gap seen in recent exchanges; DECIDED in
    ALGORITHMS.md: eps from the observed spread of the models). The guaranteed radius is
    ``(q/2 - 1) eps`` (``q eps / 2`` less one step for the rounding), so ``eps = safety *
    distance / (q/2 - 1)``. The rounding variance is ``<= eps^2 / 4`` a coordinate: a larger
    ``safety`` makes decode failures rarer and the quantization noisier. A zero distance
    gives the smallest step that keeps ``x / eps`` far from int64 overflow for ``|x| < 1e6``.
    """
    require_int(bits, "lattice bits", 2, 32)
    if not (math.isfinite(distance_estimate) and distance_estimate >= 0):
        raise ConfigError(f"lattice distance estimate must be finite and >= 0, "
                          f"got {distance_estimate!r}")
    if not (math.isfinite(safety) and safety > 0):
        raise ConfigError(f"lattice safety must be a finite number > 0, got {safety!r}")
    return max(safety * distance_estimate / (2 ** (bits - 1) - 1), 1e-12)


def _check_codes(p: LatticePayload) -> None:
    """A payload (possibly from the network) whose codes are what its bits and numel say,
    for values of a floating-point dtype (what decode writes)."""
    if not (isinstance(p.bits, int) and 2 <= p.bits <= 32):
        raise ConfigError(f"lattice payload: bits={p.bits!r}, expected 2..32")
    want = (_NATIVE.get(p.bits, torch.uint8),
            p.numel if p.bits in _NATIVE else math.ceil(p.numel * p.bits / 8))
    if (p.codes.dtype, p.codes.numel()) != want:
        raise ConfigError(f"lattice payload: {p.codes.numel()} codes of {p.codes.dtype} for "
                          f"{p.numel} values of {p.bits} bits; expected {want[1]} of {want[0]}")
    if not (isinstance(p.dtype, torch.dtype) and p.dtype.is_floating_point):
        raise ConfigError(f"lattice payload: values of dtype {p.dtype!r}, expected a "
                          "floating-point dtype (the model's)")


def _residues(p: LatticePayload) -> Tensor:
    """``r mod q`` from checked codes: uint8 codes are the residues; the signed types
    hold the bit pattern (masked in int32 for 16 bits, int64 for 32); other widths are
    unpacked."""
    if p.bits == 8:
        return p.codes
    if p.bits in _NATIVE:
        wide = torch.int32 if p.bits < 32 else torch.int64
        return p.codes.to(wide).bitwise_and_((1 << p.bits) - 1)
    return unpack_bits(p.codes, p.bits, p.numel)


@dataclass(frozen=True)
class LatticePayload:
    """What travels: ``codes`` (the residues, native or bit-packed), ``eps``, ``check``.

    ``numel``, ``shape``, ``dtype`` and ``bits`` are known to both sides and not counted.
    """

    codes: Tensor
    eps: float
    check: int
    bits: int
    numel: int
    shape: torch.Size
    dtype: torch.dtype


class LatticeQuantizer:
    """modular quantization decoded against the receiver's model (Davies et al. 2021)

    ``bits``: bits a coordinate (2..32; ``q = 2^bits``; the SwarmSGD authors used 16).
    ``eps``: a fixed lattice step (authors: ``0.0035 / n``), or None to choose it per message
    with :func:`choose_eps` from a distance estimate and ``safety``. Same API as
    :class:`~relaxsgd.quantize.qsgd_diff.QSGDDiffQuantizer`: ``encode``, ``decode`` (returns
    ``(x_hat, ok)``), ``nbytes``. Unbiased when the decode succeeds.
    """

    name = "lattice"
    unbiased = True

    def __init__(self, bits: int = 8, eps: float | None = None, safety: float = 4.0) -> None:
        choose_eps(1.0, bits, safety)  # validates bits and safety with one-line errors
        if eps is not None and not (math.isfinite(eps) and eps > 0):
            raise ConfigError(f"lattice eps must be a finite number > 0 or None (chosen "
                              f"from the models' spread), got {eps!r}")
        self.bits, self.eps, self.safety = bits, eps, safety
        self.q = 1 << bits

    def eps_for(self, distance_estimate: float) -> float:
        """The fixed ``eps`` if one was given, else :func:`choose_eps` for this distance."""
        if self.eps is not None:
            return self.eps
        return choose_eps(distance_estimate, self.bits, self.safety)

    def encode(self, x: Tensor, eps: float | None = None,
               generator: torch.Generator | None = None,
               reference: Tensor | None = None) -> LatticePayload:
        """Quantize ``x`` with step ``eps`` (else the fixed one, else chosen from
        ``max|x - reference|`` where ``reference`` is the sender's guess of the receiver's
        model, e.g. its last copy of it). Stochastic rounding draws from ``generator``."""
        if eps is None:
            if self.eps is None and reference is None:
                raise ConfigError("lattice encode needs eps: pass eps=, a fixed eps to "
                                  "LatticeQuantizer, or a reference to choose it from")
            eps = self.eps_for(max_abs(x - reference) if reference is not None else 0.0)
        return self.encode_value(x, eps, generator)[0]

    @metered("encoded", lambda out, a, k: out[1].numel())
    def encode_value(self, x: Tensor, eps: float,
                     generator: torch.Generator | None = None) -> tuple[LatticePayload, Tensor]:
        """``(payload, x_hat)`` for step ``eps``: ``x_hat`` is what the payload decodes to
        against any reference within the decode radius (``x`` itself among them), made
        from the integers at hand: the sender's own copy without a second pass of decode.

        Rounding: ``r`` is ``floor(x / eps)`` or one more, one more with probability the
        fraction to within ``2^-31`` (:func:`round_stochastic_`: ``floor(x / eps + k
        2^-31)`` with ``k`` uniform in ``[0, 2^31)`` from ``generator``), so ``|E[r eps] -
        x| <= 2^-31 eps + 2^-53 |x|`` (the draw's resolution, and the float64 rounding of ``x
        / eps``), far below float32's own rounding of ``x_hat`` (``2^-24 |x|``). ``|x| /
        eps`` must be below ``2^52`` (so that ``r`` is exact in float64), else
        :class:`ConfigError`.

        Cost (the codec is SwarmSGD's CPU time per exchange): the float64 buffer ``y`` is
        the only temporary the size of the model; 31-bit integers are the cheapest random
        numbers torch draws; codes come from ``r`` through int32 when ``|r| < 2^31`` (and the
        residue is the low bits: a cast or a mask, not a division); ``x_hat`` is written
        straight into ``x``'s dtype.
        """
        # what float32 carries (a host scalar: read back at once)
        wire_eps = float(torch.tensor(eps, dtype=torch.float32, device="cpu"))
        if not (math.isfinite(wire_eps) and wire_eps > 0):
            raise ConfigError(f"lattice eps must be a finite float32 > 0, got {eps!r}")
        eps, size = wire_eps, max_abs(x)
        if size / eps >= 2.0 ** 52:  # keep r = x / eps exact in float64 and int64
            raise ConfigError(f"lattice eps={eps:g} is too small for values of size "
                              f"{size:g}; use eps >= {size / 2.0 ** 50:g}")
        flat = x.detach().reshape(-1)
        y = torch.empty(flat.shape, dtype=torch.float64, device=flat.device)
        y.copy_(flat).div_(eps)
        r = round_stochastic_(y, draw_offsets(y.numel(), generator, y.device), size / eps)
        bound = size / eps + 1  # |r| <= |x| / eps + 1
        check = float_checksum(r, bound)
        codes = self._codes(r, bound)
        x_hat = torch.empty(flat.shape, dtype=x.dtype, device=flat.device)
        torch.mul(r, eps, out=x_hat)  # r eps rounded once to x's dtype, as decode makes it
        payload = LatticePayload(codes, eps, check, self.bits, r.numel(), x.shape, x.dtype)
        return payload, x_hat.view(x.shape)

    def _codes(self, r: Tensor, bound: float) -> Tensor:
        """``r mod q`` as sent, from the integers ``r`` (float64, ``|r| <= bound``): the
        native types hold the low ``bits`` of ``r`` (the bit pattern in the signed type of
        that width), other widths bit-packed. Through int32 when ``r`` fits it."""
        ri = r.to(torch.int32 if bound < 2.0 ** 31 else torch.int64)
        if self.bits in _NATIVE:
            return ri.to(_NATIVE[self.bits])  # truncation keeps the low bits
        return pack_bits(ri.bitwise_and_(self.q - 1), self.bits)

    @metered("decoded", lambda out, a, k: out[0].numel())
    def decode(self, payload: LatticePayload, reference: Tensor) -> tuple[Tensor, bool]:
        """``(x_hat, ok)``: the residue class point nearest to ``reference`` (the
        receiver's own model), and whether the checksum confirms it is the sent point.
        On ``ok = False`` ``x_hat`` is wrong in some coordinates; nothing is raised.

        Cost: one float64 buffer; ``r = m q + z`` is held as ``r / q`` (exact: ``q`` is a
        power of two) so that ``q`` folds into the checksum and into ``x_hat = (r / q) (q
        eps)``, the same floats as ``r eps``; 8-bit codes are the residues as they are.
        """
        if reference.numel() != payload.numel:
            raise ConfigError(f"lattice decode: reference has {reference.numel()} values, "
                              f"the payload {payload.numel}; decode against the same model")
        _check_codes(payload)
        q, eps = 1 << payload.bits, payload.eps
        z = _residues(payload)
        flat = reference.detach().reshape(-1)
        b = torch.empty(flat.shape, dtype=torch.float64, device=flat.device)
        # m = round((b / eps - z) / q), as b / (q eps) - z / q: the same float64 (scaling
        # by a power of two is exact, before and after the rounding of each operation)
        b.copy_(flat).div_(eps * q).sub_(z, alpha=1.0 / q).round_()
        bound = max_abs(flat) / eps + q + 1  # |r| <= |b| + q / 2 (NaN: not below 2^52)
        if bound < 2.0 ** 52:  # r / q = m + z / q is exact in float64: no integer pass
            r_q = b.add_(z, alpha=1.0 / q)
            ok = float_checksum(r_q, bound, scale=q) == payload.check
            step = eps * q
        else:  # as int64 (wraps like the encoder's integers would, if ever)
            ri = b.to(torch.int64).mul_(q).add_(z)
            ok = checksum(ri) == payload.check
            r_q, step = b.copy_(ri), eps
        x_hat = torch.empty(flat.shape, dtype=payload.dtype, device=flat.device)
        torch.mul(r_q, step, out=x_hat)  # r eps rounded once to the model's dtype
        return x_hat.view(payload.shape), ok

    def nbytes(self, payload: LatticePayload) -> int:
        """Bytes on the wire: codes (``ceil(numel*bits/8)``) + checksum (4) + eps (4)."""
        codes = payload.codes.numel() * payload.codes.element_size()
        return codes + CHECK_BYTES + EPS_BYTES
