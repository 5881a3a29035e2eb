"""SwarmSGD's initiator side for many workers at once: their requests coded together.

Contract. When several workers' local steps end at the same virtual instant, the
simulator calls :func:`prefetch_requests` (``SwarmSGD.on_resume_batch``) before resuming
them. For each worker whose next request will be lattice coded, it computes that request
ahead, all of them as rows of one matrix (:mod:`..quantize.lattice_rows`, the per-chunk
math elementwise), and keeps it in the codec with everything it was computed from: the
worker's generator state at the moment of coding, its copy, ``last_sent`` and spread.
When the worker's program then codes its request (``Codec._lattice_encode``), the kept one
is used only if all those inputs are bit for bit the ones it sees (otherwise it is dropped
and the request coded as usual), and the generator is moved to where coding would leave
it. So the request, the generator and the codec state are exactly those of coding one by
one, whatever happened in between (an answer that moved the copy, a partner draw that
differs, a checkpoint): the result is a memo of a deterministic function of those inputs.

The generator state at coding is predicted by replaying, on a copy, the one draw the
program makes between its local steps and its request (the partner among the live
neighbours, :meth:`SwarmSGD._async`). Covered: the async schedule without overlap,
non-blocking averaging, symmetric updates, the lattice with a native width; the rest is
never prefetched. The replies the initiators decode stay one call per interaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..devices import draw
from ..quantize import lattice_rows as rows
from ..quantize.lattice import LatticePayload, draw_offsets
from .base import Worker
from .swarm_batch import MIN_BATCH, _steps, rows_per_call

if TYPE_CHECKING:
    from .swarm import SwarmSGD
    from .swarm_codec import Codec


@dataclass
class Ready:
    """A request coded ahead, with the inputs it was coded from (see the module doc)."""

    before: Tensor  # the generator's state when coding starts
    after: Tensor  # ... and when it ends
    c: Tensor  # the copy coded
    last: Tensor  # last_sent before coding
    spread: list[float] | None
    codes: Tensor
    checks: list[int]
    steps: list[float]
    own: Tensor  # what the request decodes to


def prefetch_requests(algo: SwarmSGD, ws: list[Worker], members: Any) -> int:
    """Code ahead the next request of each of ``ws`` (whose local steps end now; the
    live workers are ``members``); returns how many were coded."""
    codec, cfg = algo.codec, algo.cfg
    codec.ready.clear()
    if (codec.kind != "lattice" or cfg.schedule != "async" or cfg.overlap
            or cfg.averaging != "nonblocking" or cfg.update != "symmetric"
            or codec.q.bits not in rows.NATIVE_BITS or not codec.sizes
            or not all(s > 0 for s in codec.sizes) or len(ws) < MIN_BATCH):
        return 0
    live = set(members)
    todo: list[tuple[Worker, torch.Generator]] = []
    for w in ws:
        if w.state["spread"] is None and codec.q.eps is None:
            continue  # its first request goes in full precision
        near = sum(1 for j in algo.neighbors(w.rank) if j in live)
        if not near:
            continue
        g = torch.Generator(device=w.rng.device)
        g.set_state(w.rng.get_state())
        draw(torch.randint, near, (), generator=g, device=g.device)  # the partner draw
        todo.append((w, g))
    per = rows_per_call(sum(codec.sizes), ws[0].params.device)
    made = 0
    for a in range(0, len(todo), per):
        part = todo[a:a + per]
        if len(part) >= MIN_BATCH:
            made += _code_ahead(algo, part)
    return made


def _code_ahead(algo: SwarmSGD, part: list[tuple[Worker, torch.Generator]]) -> int:
    codec, sizes = algo.codec, tuple(algo.codec.sizes)
    ws = [w for w, _ in part]
    c = torch.stack([w.state["xhat"] for w in ws])  # the copy each will send
    spreads = [list(w.state["spread"] or [0.0] * len(sizes)) for w in ws]
    steps = _steps(algo, ws, c, spreads)
    if steps is None:
        return 0  # coded one by one: the quantizer raises its own error
    before = [g.get_state() for _, g in part]
    offsets = torch.stack([draw_offsets(c.shape[1], g, c.device) for _, g in part])
    eps = torch.tensor(steps, dtype=torch.float64, device=c.device)
    codes, checks, own = rows.encode_rows(c, eps, offsets, codec.q.bits, sizes)
    for j, (w, g) in enumerate(part):
        spread = w.state["spread"]
        codec.ready[w.rank] = Ready(before[j], g.get_state(), c[j].clone(),
                                    w.state["last_sent"].clone(),
                                    None if spread is None else list(spread),
                                    codes[j], checks[j].tolist(), steps[j], own[j])
    return len(part)


def take_ready(codec: Codec, w: Worker, c: Tensor, gen: torch.Generator
               ) -> tuple[dict, Tensor, int] | None:
    """The request kept for ``w`` if it was coded from exactly these inputs (then the
    generator and ``last_sent`` move as coding moves them), else None."""
    ready = codec.ready.pop(w.rank, None)
    if gen is not w.rng:  # a reply (the handler's generator): never prefetched
        if ready is not None:
            codec.ready[w.rank] = ready
        return None
    st = w.state
    if ready is None or not (torch.equal(gen.get_state(), ready.before)
                             and torch.equal(c, ready.c)
                             and torch.equal(st["last_sent"], ready.last)
                             and st["spread"] == ready.spread):
        return None
    gen.set_state(ready.after)
    sizes, bits = codec.sizes, codec.q.bits
    payloads = [LatticePayload(cd.clone(), e, int(ch), bits, s, torch.Size([s]), c.dtype)
                for cd, e, ch, s in zip(ready.codes.split(list(sizes)), ready.steps,
                                        ready.checks, sizes, strict=True)]
    weighted = 0.0
    for p in payloads:
        weighted += p.eps * p.numel
    st["last_sent"].copy_(c)
    w.observe("lattice_eps", weighted / max(c.numel(), 1))
    codec.prefetch_hits += 1
    nb = sum(codec.q.nbytes(p) for p in payloads)
    return {"kind": "q", "data": payloads}, ready.own.clone(), nb
