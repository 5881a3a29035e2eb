"""The lattice quantizer's math over rows of several models at once (the simulator's batch).

Contract. Each row of a ``(g, d)`` matrix is one worker's flat model, cut into chunks of
``sizes`` (SwarmSGD's ``per_tensor`` chunks: one per parameter tensor), each chunk with its
own lattice step ``eps`` (a ``(g, K)`` float64 matrix). Every function gives, bit for bit,
what :class:`~relaxsgd.quantize.lattice.LatticeQuantizer` gives for each chunk of each row
alone (same formulas elementwise, in float64 and int64; the checksums are integer sums,
exact in any order), so a batch of concurrent SwarmSGD interactions equals the same
interactions one after the other (tests/test_gossip_batch.py). Only the native widths
(8, 16, 32 bits) are supported here: others are bit-packed per chunk, which the caller
leaves to the per-message path. The random draws stay the caller's (one generator per
worker).

Why: a SwarmSGD interaction codes each of a model's chunks with ~10 small tensor calls;
with per-tensor chunks that is ~80 calls per message and ~300 per interaction, whose
per-call overhead dominates the simulator's time at hundreds of workers (and on a GPU,
where each call is a kernel launch). Rows that meet at the same virtual time share them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .lattice import _NATIVE, _P, _coefficients, round_stochastic_

NATIVE_BITS = tuple(_NATIVE)


@functools.lru_cache(maxsize=32)
def _row_coefficients(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    """The checksum coefficients of a row: each chunk's own, restarting at index 1."""
    return torch.cat([_coefficients(s, device) for s in sizes])


def expand(per_chunk: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """A ``(g, K)`` matrix repeated over each chunk's coordinates: ``(g, d)``."""
    reps = torch.tensor(sizes, device=per_chunk.device)
    return per_chunk.repeat_interleave(reps, dim=1)


def chunk_max_abs(t: Tensor, sizes: tuple[int, ...]) -> list[list[float]]:
    """``max |t|`` over each chunk of each row, as host floats (``[g][K]``)."""
    maxes = torch.stack([c.abs().amax(1) for c in t.split(list(sizes), 1)], 1)
    return maxes.tolist()


def checksums(r: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """:func:`~relaxsgd.quantize.lattice.checksum` of each chunk of each row of the int64
    matrix ``r``: ``(g, K)`` int64."""
    terms = (torch.remainder(r, _P) * _row_coefficients(sizes, r.device)) % _P
    sums = torch.stack([c.sum(1) for c in terms.split(list(sizes), 1)], 1)
    return sums % _P


def wire_eps(eps: list[float]) -> list[float]:
    """The steps as float32 carries them (what the sender puts on the wire)."""
    return torch.tensor(eps, dtype=torch.float32, device="cpu").tolist()


def nearest(z: Tensor, b: Tensor, bits: int) -> Tensor:
    """The integer point of residue ``z`` (mod ``2^bits``) nearest to ``b`` (float64, in
    units of eps): the decoder's rounding, ``round((b - z) / q) q + z``."""
    q = 1 << bits
    return torch.round((b - z) / q).to(torch.int64) * q + z


def decode_rows(codes: Tensor, eps: Tensor, ref: Tensor, bits: int,
                sizes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Decode rows of native ``codes`` (``(g, d)``) with steps ``eps`` (``(g, K)``) against
    the receivers' models ``ref`` (``(g, d)``): ``(x_hat, checks)``, the values in
    ``ref``'s dtype and each chunk's checksum (compare with the payloads' ``check``)."""
    z = codes.to(torch.int64) & ((1 << bits) - 1)  # = remainder(codes, 2^bits), cheaper
    e = expand(eps, sizes)
    r = nearest(z, ref.to(torch.float64) / e, bits)
    return (r.to(torch.float64) * e).to(ref.dtype), checksums(r, sizes)


def encode_rows(x: Tensor, eps: Tensor, k: Tensor, bits: int, sizes: tuple[int, ...]
                ) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize rows ``x`` (``(g, d)``) with steps ``eps`` (``(g, K)``, already float32
    values) and the rounding's draws ``k`` (``(g, d)`` int32 from
    :func:`~relaxsgd.quantize.lattice.draw_offsets`): ``(codes, checks, own)``, the
    native codes, each chunk's checksum, and what the codes decode to against ``x`` itself
    (the sender's exact knowledge of what its partner will decode)."""
    q = 1 << bits
    e = expand(eps, sizes)
    y = x.to(torch.float64) / e
    # each chunk rounded by the quantizer's rule for its size (in place where all are small)
    size = torch.stack([c.abs().amax(1) for c in y.split(list(sizes), 1)], 1)
    small = size < 2.0 ** 21
    if bool(small.all()):
        r = round_stochastic_(y, k, 0.0)
    else:
        r = torch.where(expand(small, sizes), round_stochastic_(y.clone(), k, 0.0),
                        round_stochastic_(y, k, float("inf")))
    own = (r * e).to(x.dtype)  # r is the residue class point nearest to y: |r - y| < 1
    r = r.to(torch.int64)
    z = r & (q - 1)  # = remainder(r, q) for int64 (two's complement), without a division
    signed = z - q * (z >= q // 2) if bits > 8 else z  # the bit pattern, two's complement
    return signed.to(_NATIVE[bits]), checksums(r, sizes), own
