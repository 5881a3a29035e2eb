"""The message codec of SwarmSGD: how a worker's copy travels (see :mod:`.swarm`).

Contract. :class:`Codec` is built from a :class:`~.swarm.SwarmConfig` (``quantizer``
"none", "lattice" or "qsgd" and its options) and keeps no per-worker state itself:
``init(w)`` puts the worker's codec state in ``w.state`` (lattice: ``spread``, the observed
per-chunk gap to partners, and ``last_sent``; qsgd: ``qref_out`` / ``qref_in``, the
per-peer, per-direction references with their message numbers).

- ``encode(w, peer, c, gen) -> (msg, q_own, nbytes)``: ``msg["kind"]`` is "full" or "q";
  ``q_own`` is exactly what the receiver decodes when decoding succeeds; ``nbytes`` is
  what the network is charged. Full precision is sent when there is nothing to code
  against yet (qsgd: the first message of a direction; lattice with adaptive eps: before
  any spread has been seen).
- ``decode(w, src, msg, ref) -> (value, ok)``: ``ref`` is the receiver's own copy (the
  lattice decodes against it); ``ok`` False on a lattice checksum failure or a qsgd
  message out of order, in which case the caller must obtain a full-precision message.
- ``full(w, peer, value) -> (msg, value, nbytes)``: a full-precision message; for qsgd it
  also resets the reference of that direction, so it is the resynchronising fallback.

The fallback protocol (resend / fetch / commit) is the caller's: :class:`~.swarm.SwarmSGD`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..quantize.lattice import LatticeQuantizer, max_abs
from ..quantize.qsgd_diff import QSGDDiffQuantizer
from .base import Worker, tensor_nbytes
from .swarm_prefetch import take_ready

if TYPE_CHECKING:
    from .swarm_config import SwarmConfig


# The lattice's rounding noise becomes part of the models' disagreement, which sets the
# next eps: the next spread grows by about NOISE_GAIN * eps. With eps = safety * D /
# (2^(bits-1) - 1) that loop is stable only while safety < (2^(bits-1) - 1) / NOISE_GAIN.
# Measured (benchmarks/swarm_lattice_bits.py, MNIST-1D MLP, 16 workers, 200 steps): at 4
# bits safety 1.5 stays bounded, 2.0 blows eps up within 60 steps (accuracy 10%), so the
# gain is between 3.5 and 4.7.
NOISE_GAIN = 4.5
# Decoding needs the radius (2^(bits-1) - 1) eps = safety * D above the next gap, which
# the decaying spread estimate misses by some margin: below this safety most interactions
# fail (measured at 4 bits: safety 0.875 fails 23% of interactions, 1.0 13%, 1.5 1-3%).
MIN_SAFETY = 1.25


def safety_cap(bits: int) -> float:
    """The largest safety at which the adaptive eps stays bounded (see NOISE_GAIN)."""
    return (2 ** (bits - 1) - 1) / NOISE_GAIN


def effective_safety(bits: int, safety: float) -> float:
    """``min(safety, safety_cap(bits))``: binds only at 4 bits at the default 2 (to 1.56).
    (It was ``(2^(bits-1) - 1) / 8``, 0.875 at 4 bits: a decode radius below the expected
    gap, so 23% of interactions failed and 46% of the bytes were full-precision fallbacks,
    more bytes than 6 bits; issue 9.) Below 4 bits the cap is under MIN_SAFETY: no
    adaptive eps both decodes and stays bounded, and :class:`~.swarm.SwarmConfig` refuses
    it (a fixed ``eps`` is still allowed)."""
    return min(safety, safety_cap(bits))


class Codec:
    """How a worker's copy travels: full precision, lattice, or qsgd difference.

    ``encode(w, peer, c, gen) -> (msg, q_own, nbytes)``: ``q_own`` is what ``msg`` decodes
    to at the receiver when decoding succeeds (the sender knows it exactly).
    ``decode(w, src, msg, ref) -> (value, ok)``; ``full(w, peer, value)`` a full-precision
    message (it also resynchronises qsgd references). The lattice codes each chunk (each
    parameter tensor with ``per_tensor``, else the whole model) with its own ``eps``.
    """

    def __init__(self, cfg: SwarmConfig) -> None:
        self.kind = cfg.quantizer
        self.quantized = self.kind != "none"
        self.per_tensor, self.decay = cfg.per_tensor, cfg.spread_decay
        self.sizes: list[int] = []
        self.q: Any = None
        # requests coded ahead for many workers at once, by rank (simulator only; see
        # swarm_prefetch: used only when coded from exactly the inputs at hand)
        self.ready: dict[int, Any] = {}
        self.prefetch_hits = 0
        if self.kind == "lattice":
            self.q = LatticeQuantizer(cfg.bits, cfg.eps, effective_safety(cfg.bits, cfg.safety))
        elif self.kind == "qsgd":
            self.q = QSGDDiffQuantizer(cfg.bits, cfg.bucket_size)

    def init(self, w: Worker) -> None:
        if self.kind == "lattice":
            d = w.params.numel()
            self.sizes = [s.numel() for _, s in w.layout] if self.per_tensor else [d]
            w.state.update(spread=None, last_sent=w.params.clone())
        elif self.kind == "qsgd":
            w.state.update(qref_out={}, qref_in={})

    def full(self, w: Worker, peer: int, value: Tensor) -> tuple[dict, Tensor, int]:
        msg: dict[str, Any] = {"kind": "full", "data": value.clone()}
        nb = tensor_nbytes(value)
        if self.kind == "qsgd":
            ver = w.state["qref_out"].get(peer, (0, None))[0] + 1
            w.state["qref_out"][peer] = (ver, msg["data"])
            msg["ver"] = ver
            nb += 4
        return msg, value, nb

    def encode(self, w: Worker, peer: int, c: Tensor,
               gen: torch.Generator) -> tuple[dict, Tensor, int]:
        if self.kind == "none":
            return self.full(w, peer, c)
        if self.kind == "lattice":
            return self._lattice_encode(w, c, gen)
        if peer not in w.state["qref_out"]:  # no shared reference yet: the first is full
            return self.full(w, peer, c)
        ver, ref = w.state["qref_out"][peer]
        payload = self.q.encode(c, reference=ref, generator=gen)
        q_own, _ = self.q.decode(payload, ref)
        w.state["qref_out"][peer] = (ver + 1, q_own)
        return {"kind": "q", "data": payload, "ver": ver + 1}, q_own, self.q.nbytes(payload) + 4

    def _lattice_encode(self, w: Worker, c: Tensor,
                        gen: torch.Generator) -> tuple[dict, Tensor, int]:
        st = w.state
        if st["spread"] is None and self.q.eps is None:  # no spread seen yet: send in full
            st["last_sent"].copy_(c)
            return self.full(w, -1, c)
        if self.ready:
            kept = take_ready(self, w, c, gen)
            if kept is not None:
                return kept
        payloads, own, weighted_eps = [], [], 0.0
        spread = st["spread"] or [0.0] * len(self.sizes)
        for k, (part, last) in enumerate(zip(c.split(self.sizes),
                                             st["last_sent"].split(self.sizes), strict=True)):
            gap = spread[k] + max_abs(part - last)
            eps = max(self.q.eps_for(gap), max_abs(part) / 2.0 ** 48)
            payload, q_own = self.q.encode_value(part, eps, gen)  # = decode(payload, part)
            payloads.append(payload)
            own.append(q_own)
            weighted_eps += payload.eps * part.numel()
        st["last_sent"].copy_(c)
        w.observe("lattice_eps", weighted_eps / max(c.numel(), 1))
        nb = sum(self.q.nbytes(p) for p in payloads)
        return {"kind": "q", "data": payloads}, torch.cat(own), nb

    def _spread(self, w: Worker, parts: Any, ref: Tensor) -> None:
        """Update the observed spread, per chunk: the largest coordinate gap between a
        partner's decoded copy and this worker's, as a decaying maximum."""
        old = w.state["spread"] or [0.0] * len(self.sizes)  # (None before the first)
        w.state["spread"] = [max(max_abs(a - b), self.decay * o) for a, b, o in
                             zip(parts, ref.split(self.sizes), old, strict=True)]

    def decode(self, w: Worker, src: int, msg: dict, ref: Tensor) -> tuple[Tensor, bool]:
        if msg["kind"] == "full":
            value = msg["data"]
            if self.kind == "qsgd":
                w.state["qref_in"][src] = (msg["ver"], value)
            elif self.kind == "lattice":
                self._spread(w, value.split(self.sizes), ref)
            return value, True
        if self.kind == "lattice":
            parts, ok = [], True
            for payload, r in zip(msg["data"], ref.split(self.sizes), strict=True):
                v, good = self.q.decode(payload, r)
                parts.append(v)
                ok = ok and good
            value = torch.cat(parts)
            if ok:
                self._spread(w, parts, ref)
            return value, ok
        ver, r = w.state["qref_in"].get(src, (-1, None))
        if msg["ver"] != ver + 1:  # a message overtook another: references out of step
            return ref, False
        value, _ = self.q.decode(msg["data"], r)
        w.state["qref_in"][src] = (ver + 1, value)
        return value, True
