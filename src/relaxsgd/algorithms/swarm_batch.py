"""SwarmSGD's partner side for many interactions at once (see :mod:`.swarm`).

Contract. :func:`answer_many` is :meth:`SwarmSGD.on_exchange_batch`: given requests that
reach DISTINCT workers at the same virtual time, it returns exactly the replies, and
leaves exactly the worker state (published copy, deferred delta, codec state, pending
values, generators, counters), that :meth:`SwarmSGD.on_exchange` called on each in turn
would. That holds because a handler touches its own worker only, so distinct workers'
handlers commute, and because the batched lattice math (:mod:`..quantize.lattice_rows`)
is the per-chunk math elementwise. The batched case is the default one: non-blocking
averaging, symmetric "avg" requests, the lattice with a native width (8, 16, 32 bits);
every other request (pull, commit, fetch, blocking averaging, qsgd, full precision
everywhere, other widths) goes through ``on_exchange`` one by one.

Order of work (so that nothing is written before everything is checked): decode every
request, compute each worker's new spread and its reply's lattice steps on the host, check
the steps as the quantizer would; only then draw, encode and write. If a check fails, the
requests are answered one by one, which raises the quantizer's own error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..quantize import lattice_rows as rows
from ..quantize.lattice import CHECK_BYTES, EPS_BYTES, LatticePayload, draw_offsets
from .base import Deferred, Reply, Worker
from .swarm_state import add_later

if TYPE_CHECKING:
    from .swarm import SwarmSGD

# a lone request takes the per-message path (no stacking for nothing)
MIN_BATCH = 2
# Coordinates (rows x d) coded per call. The codec is a chain of ~40 elementwise float64 and
# int64 passes: on a CPU they pay only while a call's temporaries stay in cache; measured
# here (benchmarks/gossip_batch.py, 8-bit lattice): logistic regression (d = 330), 32 rows
# per call, 40x faster per interaction than one call each; the MNIST-1D MLP (d = 79k),
# 8 rows (632k coordinates), 0.8x, 32 rows 0.5x. So a CPU batches small models only; a
# GPU batches everything, bounded for memory (~10 float64 temporaries of this size).
CPU_COORDS, GPU_COORDS = 1 << 17, 1 << 26


def rows_per_call(d: int, device: torch.device) -> int:
    """How many requests of a d-parameter model one batched call codes on ``device``."""
    return max(1, (CPU_COORDS if device.type == "cpu" else GPU_COORDS) // max(d, 1))


def batchable(algo: SwarmSGD, payload: Any) -> bool:
    """Whether ``payload`` is a request :func:`answer_many` codes together with others."""
    codec = algo.codec
    if (codec.kind != "lattice" or algo.cfg.averaging != "nonblocking"
            or codec.q.bits not in rows.NATIVE_BITS or payload.get("op") != "avg"):
        return False
    if payload["kind"] == "full":
        return True
    data = payload["data"]
    return len(data) == len(codec.sizes) and all(
        p.numel == s and p.bits == codec.q.bits for p, s in zip(data, codec.sizes, strict=True))


def answer_many(algo: SwarmSGD, ws: list[Worker], srcs: list[int],
                payloads: list[Any]) -> list[Reply | Deferred]:
    """The replies of ``ws`` (distinct workers) to ``payloads`` from ``srcs``, in order."""
    out: list[Reply | Deferred | None] = [None] * len(ws)
    fast = [k for k, p in enumerate(payloads) if batchable(algo, p)]
    per = rows_per_call(sum(algo.codec.sizes), ws[0].params.device) if ws else 1
    if all(s > 0 for s in algo.codec.sizes):
        for a in range(0, len(fast), per):
            part = fast[a:a + per]
            if len(part) < MIN_BATCH:
                continue  # one by one below
            got = _answer_lattice(algo, [ws[k] for k in part], [srcs[k] for k in part],
                                  [payloads[k] for k in part])
            for k, reply in zip(part, got or [None] * len(part), strict=True):
                out[k] = reply
    return [a if a is not None else algo.on_exchange(w, s, p)
            for a, w, s, p in zip(out, ws, srcs, payloads, strict=True)]


def _decode(algo: SwarmSGD, payloads: list[Any], c: Tensor
            ) -> tuple[Tensor, list[bool]]:
    """The partners' copies (rows) as each receiver decodes them, and whether it could."""
    sizes, bits = tuple(algo.codec.sizes), algo.codec.q.bits
    coded = [k for k, p in enumerate(payloads) if p["kind"] == "q"]
    value = torch.empty_like(c)
    ok = [True] * len(payloads)
    for k, p in enumerate(payloads):
        if p["kind"] == "full":
            value[k] = p["data"]
    if coded:
        codes = torch.stack([torch.cat([pl.codes for pl in payloads[k]["data"]])
                             for k in coded])
        eps = torch.tensor([[pl.eps for pl in payloads[k]["data"]] for k in coded],
                           dtype=torch.float64, device=c.device)
        xhat, checks = rows.decode_rows(codes, eps, c[coded], bits, sizes)
        value[coded] = xhat
        sent = [[pl.check for pl in payloads[k]["data"]] for k in coded]
        for j, (k, got) in enumerate(zip(coded, checks.tolist(), strict=True)):
            ok[k] = got == sent[j]
    return value, ok


def _steps(algo: SwarmSGD, ws: list[Worker], c: Tensor, spreads: list[list[float]]
           ) -> list[list[float]] | None:
    """Each reply's lattice steps, chunk by chunk, as ``Codec._lattice_encode`` and
    ``LatticeQuantizer.encode`` choose and check them; None if a check would fail."""
    sizes, q = tuple(algo.codec.sizes), algo.codec.q
    last = torch.stack([w.state["last_sent"] for w in ws])
    size = rows.chunk_max_abs(c, sizes)
    moved = rows.chunk_max_abs(c - last, sizes)
    wanted = [max(q.eps_for(s + m), a / 2.0 ** 48) for sp, mv, sz in
              zip(spreads, moved, size, strict=True) for s, m, a in zip(sp, mv, sz, strict=True)]
    flat = rows.wire_eps(wanted)
    K = len(sizes)
    steps = [flat[i * K:(i + 1) * K] for i in range(len(ws))]
    for st, sz in zip(steps, size, strict=True):
        for e, a in zip(st, sz, strict=True):
            if not (e > 0 and e != float("inf") and a / e < 2.0 ** 52):
                return None
    return steps


def _answer_lattice(algo: SwarmSGD, ws: list[Worker], srcs: list[int],
                    payloads: list[Any]) -> list[Reply] | None:
    codec, sizes = algo.codec, tuple(algo.codec.sizes)
    c = torch.stack([w.state["xhat"] for w in ws])  # what each would send: its copy
    stale = [algo._stale(w) for w in ws]
    q_other, ok = _decode(algo, payloads, c)
    good = [k for k in range(len(ws)) if ok[k]]
    gap = rows.chunk_max_abs(q_other[good] - c[good], sizes) if good else []
    spreads = [[max(g, codec.decay * o) for g, o in
                zip(gk, ws[k].state["spread"] or [0.0] * len(sizes), strict=True)]
               for k, gk in zip(good, gap, strict=True)]
    steps = _steps(algo, [ws[k] for k in good], c[good], spreads) if good else []
    if steps is None:
        return None  # answered one by one: the quantizer raises its own error
    replies = [Reply({"status": "resend"}, 4) for _ in ws]
    for k in range(len(ws)):
        if not ok[k]:
            ws[k].count("decode_failures")
    if not good:
        return replies
    gw = [ws[k] for k in good]
    for w, sp in zip(gw, spreads, strict=True):
        w.state["spread"] = sp
    offsets = torch.stack([draw_offsets(c.shape[1], w.state["hrng"], c.device) for w in gw])
    eps = torch.tensor(steps, dtype=torch.float64, device=c.device)
    codes, checks, own = rows.encode_rows(c[good], eps, offsets, codec.q.bits, sizes)
    delta = algo._delta(own, q_other[good], c[good])
    bits = codec.q.bits
    for j, (k, w) in enumerate(zip(good, gw, strict=True)):
        chunks = [LatticePayload(cd.clone(), e, int(ch), bits, s, torch.Size([s]), c.dtype)
                  for cd, e, ch, s in zip(codes[j].split(list(sizes)), steps[j],
                                          checks[j].tolist(), sizes, strict=True)]
        weighted = 0.0
        for e, s in zip(steps[j], sizes, strict=True):
            weighted += e * s
        w.state["last_sent"].copy_(c[k])
        w.observe("lattice_eps", weighted / max(c.shape[1], 1))
        nb = sum(p.codes.numel() * p.codes.element_size() + CHECK_BYTES + EPS_BYTES
                 for p in chunks)
        msg: dict[str, Any] = {"kind": "q", "data": chunks}
        algo._keep(w, srcs[k], payloads[k]["seq"], msg, own[j].clone())
        add_later(w, delta[j])
        w.state["xhat"].add_(delta[j])  # the published copy moves; unpublished progress stays
        algo._interacted(w, payloads[k]["stale"])
        replies[k] = Reply({**msg, "status": "ok", "stale": stale[k]}, nb)
    return replies
