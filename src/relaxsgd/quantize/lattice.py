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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import require_int
from ..devices import draw
from ..errors import ConfigError

_P = (1 << 31) - 1  # Mersenne prime modulus of the checksum
_NATIVE = {8: torch.uint8, 16: torch.int16, 32: torch.int32}
CHECK_BYTES = 4
EPS_BYTES = 4


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative ints ``< 2^bits`` (any shape) into ``ceil(numel*bits/8)`` uint8.

    Little-endian bit order, value after value. Loops over bit positions (not values) so the
    temporaries stay at one byte per bit.
    """
    v = values.reshape(-1).to(torch.int64)
    nbits = v.numel() * bits
    flat = torch.zeros(math.ceil(nbits / 8) * 8, dtype=torch.uint8, device=v.device)
    grid = flat[:nbits].view(-1, bits) if nbits else flat[:0].view(0, bits)
    for k in range(bits):
        grid[:, k] = ((v >> k) & 1).to(torch.uint8)
    octets = flat.view(-1, 8)
    out = flat.new_zeros(octets.shape[0])
    for k in range(8):
        out |= octets[:, k] << k
    return out


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` int64 values in ``[0, 2^bits)``."""
    flat = packed.new_empty(packed.numel() * 8, dtype=torch.uint8)
    octets = flat.view(-1, 8)
    for k in range(8):
        octets[:, k] = (packed >> k) & 1
    grid = flat[:numel * bits].view(numel, bits)
    out = packed.new_zeros(numel, dtype=torch.int64)
    for k in range(bits):
        out |= grid[:, k].to(torch.int64) << k
    return out


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
    """Random linear hash of an int64 vector mod ``2^31 - 1`` (deterministic, shared).

    The coefficient of index ``i`` comes from a fixed integer mix of ``i``; every
    intermediate product stays below ``2^62``, so int64 never overflows.
    """
    terms = (torch.remainder(r.reshape(-1), _P) * _coefficients(r.numel(), r.device)) % _P
    return int(terms.sum() % _P)  # sum < numel * 2^31 < 2^63 for numel < 2^32


def _max_abs(t: Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


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
            eps = self.eps_for(_max_abs(x - reference) if reference is not None else 0.0)
        # what float32 carries (a host scalar: read back at once)
        wire_eps = float(torch.tensor(eps, dtype=torch.float32, device="cpu"))
        if not (math.isfinite(wire_eps) and wire_eps > 0):
            raise ConfigError(f"lattice eps must be a finite float32 > 0, got {eps!r}")
        eps, size = wire_eps, _max_abs(x)
        if size / eps >= 2.0 ** 52:  # keep r = x / eps exact in float64 and int64
            raise ConfigError(f"lattice eps={eps:g} is too small for values of size "
                              f"{size:g}; use eps >= {size / 2.0 ** 50:g}")
        y = x.detach().reshape(-1).to(torch.float64) / eps
        low = torch.floor(y)
        u = draw(torch.rand, y.shape, generator=generator, dtype=torch.float64, device=y.device)
        r = low.to(torch.int64) + (u < (y - low)).to(torch.int64)  # unbiased: E[r] = y
        z = torch.remainder(r, self.q)
        if self.bits in _NATIVE:
            # Store the bit pattern in the signed type of the same width (two's complement).
            signed = z - self.q * (z >= self.q // 2) if self.bits > 8 else z
            codes = signed.to(_NATIVE[self.bits])
        else:
            codes = pack_bits(z, self.bits)
        return LatticePayload(codes, eps, checksum(r), self.bits, y.numel(), x.shape, x.dtype)

    def decode(self, payload: LatticePayload, reference: Tensor) -> tuple[Tensor, bool]:
        """``(x_hat, ok)``: the residue class point nearest to ``reference`` (the
        receiver's own model), and whether the checksum confirms it is the sent point.
        On ``ok = False`` ``x_hat`` is wrong in some coordinates; nothing is raised."""
        if reference.numel() != payload.numel:
            raise ConfigError(f"lattice decode: reference has {reference.numel()} values, "
                              f"the payload {payload.numel}; decode against the same model")
        q, eps = 1 << payload.bits, payload.eps
        if payload.bits in _NATIVE:
            z = torch.remainder(payload.codes.to(torch.int64), q)
        else:
            z = unpack_bits(payload.codes, payload.bits, payload.numel)
        b = reference.detach().reshape(-1).to(torch.float64) / eps
        r = torch.round((b - z) / q).to(torch.int64) * q + z
        ok = checksum(r) == payload.check
        x_hat = (r.to(torch.float64) * eps).to(payload.dtype).reshape(payload.shape)
        return x_hat, ok

    def nbytes(self, payload: LatticePayload) -> int:
        """Bytes on the wire: codes (``ceil(numel*bits/8)``) + checksum (4) + eps (4)."""
        codes = payload.codes.numel() * payload.codes.element_size()
        return codes + CHECK_BYTES + EPS_BYTES
