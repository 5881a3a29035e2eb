"""Bit packing of small non-negative integers: the quantizers' wire form of codes narrower
than a byte (the lattice's and the differential QSGD's).

``pack_bits(values, bits)`` writes ``ceil(numel * bits / 8)`` bytes, little-endian bit
order, value after value (the tail of the last byte zero); :func:`unpack_bits` inverts it.
The byte count is what the quantizers' ``nbytes`` report, so it is the real wire size.
(The compressors' QSGD and scaled sign pack big-endian, :mod:`relaxsgd.compress.base`: a
wire format of their own, pinned byte for byte by ``tests/test_compress_values.py``.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack non-negative ints ``< 2^bits`` (any shape) into ``ceil(numel*bits/8)`` uint8.

    Little-endian bit order, value after value. Where ``g = 8 / gcd(bits, 8)`` values (the
    fewest that end on a byte boundary) fit one int64 (bits 1-8, 10, 12, 14, 16, 20, 24, 28,
    32) they are shifted into one word that is cut into bytes: a few passes over the
    values. Other widths loop over bit positions, temporaries one byte a bit.
    """
    v = values.reshape(-1).to(torch.int64)
    group = _group(bits)
    if group:
        return _pack_words(v, bits, group)
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


def _group(bits: int) -> int:
    """Values per word: the fewest that fill whole bytes, if they fit in 64 bits, else 0."""
    g = 8 // math.gcd(bits, 8)
    return g if g * bits <= 64 else 0


def _pack_words(v: Tensor, bits: int, group: int) -> Tensor:
    n, nbytes = v.numel(), math.ceil(v.numel() * bits / 8)
    if group > 1 and n % group:  # pad with zeros to whole groups (the tail bits are zero)
        v = torch.cat([v, v.new_zeros(group - n % group)])
    cols = v.view(-1, group)
    word = cols[:, 0].clone()
    for j in range(1, group):  # value j at bit j * bits (two's complement past bit 62)
        word |= cols[:, j] << (j * bits)
    width = group * bits // 8  # bytes a word
    out = torch.empty(word.numel(), width, dtype=torch.uint8, device=v.device)
    for k in range(width):
        out[:, k] = (word >> (8 * k)) & 255
    return out.view(-1)[:nbytes]


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` int64 values in ``[0, 2^bits)``."""
    group = _group(bits)
    if group:
        return _unpack_words(packed, bits, group, numel)
    flat = packed.new_empty(packed.numel() * 8, dtype=torch.uint8)
    octets = flat.view(-1, 8)
    for k in range(8):
        octets[:, k] = (packed >> k) & 1
    grid = flat[:numel * bits].view(numel, bits)
    out = packed.new_zeros(numel, dtype=torch.int64)
    for k in range(bits):
        out |= grid[:, k].to(torch.int64) << k
    return out


def _unpack_words(packed: Tensor, bits: int, group: int, numel: int) -> Tensor:
    width = group * bits // 8
    words = math.ceil(numel / group)
    octets = packed.new_zeros(words * width)
    octets[:min(packed.numel(), octets.numel())] = packed[:octets.numel()]
    octets = octets.view(words, width).to(torch.int64)
    word = octets[:, 0].clone()
    for k in range(1, width):
        word |= octets[:, k] << (8 * k)
    out = torch.empty(words, group, dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for j in range(group):
        out[:, j] = (word >> (j * bits)) & mask
    return out.view(-1)[:numel]
