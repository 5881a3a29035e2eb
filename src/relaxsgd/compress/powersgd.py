"""PowerSGD: rank-r compression by one step of subspace (power) iteration with warm start
(Vogels, Karimireddy & Jaggi, NeurIPS 2019, "PowerSGD: Practical Low-Rank Gradient
Compression for Distributed Optimization"; the compressor of OLCO3-VQ).

Layout. ``init_state(numel, layout)`` takes the (name, shape) of each parameter in flat
order. A parameter with 2 or more dimensions is a matrix ``M`` of shape ``(shape[0], -1)``
(conv kernels ``(out, in, kh, kw)`` become ``(out, in*kh*kw)``); it is compressed when that
saves bytes, ``rank * (rows + cols) < rows * cols``, like the authors' code. Everything else
(biases, norms, scalars, small matrices, and the whole vector when no layout is given) is
sent uncompressed. Each compressed matrix keeps ``Q`` (cols x rank) in the state, drawn
i.i.d. normal from ``seed`` at ``init_state``: identical on every worker, as the protocol
requires.

Communication schedule of :meth:`PowerSGD.mean` (Algorithm 1 of the paper), per call:

1. ``P_i = M_i Q`` for each matrix; all-reduce (mean) of all the ``P_i`` together with the
   uncompressed entries, in one buffer: ``4 * (sum |P| + #uncompressed)`` bytes;
2. ``P_hat = orth(mean P)`` (reduced QR: orthonormal columns, the same on every worker);
3. ``Q_i = M_i^T P_hat``; all-reduce (mean) of the ``Q_i``: ``4 * sum |Q|`` bytes;
4. the mean is ``P_hat (mean Q)^T`` per matrix; ``mean Q`` is the warm start of the next call.

What this worker's own message decodes to (``own`` in :meth:`Compressor.mean`, which error
feedback subtracts) is ``P_hat Q_i^T``, its local rank-r approximation in the shared
subspace, as in the authors' implementation (their ``memory = M - P_hat Q_i^T``).

Standalone :meth:`PowerSGD.compress` (one worker, no communication): ``power_iters``
iterations of ``P = orth(M Q); Q = M^T P`` from the warm start; the payload is (P, Q) and
decodes to ``P Q^T``. A matrix of rank <= r is reproduced exactly after one iteration (for
a generic Q, ``M Q`` spans the column space of M, and ``P P^T M = M``).

Wire size of a payload: ``4 * (sum |P| + sum |Q| + #uncompressed)`` bytes. Biased; summable
through its own two-all-reduce protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..algorithms.base import AllReduce, Program
from ..checks import require_int
from ..codec_meter import note
from ..devices import draw
from ..errors import ConfigError
from .base import Compressor, Layout, check_flat


@dataclass
class PowerSGDPayload:
    dense: Tensor  # float32, the uncompressed entries in flat order
    ps: list[Tensor]  # per compressed matrix, rows x rank (orthonormal columns)
    qs: list[Tensor]  # per compressed matrix, cols x rank
    layout: list[tuple[str, tuple[int, ...]]]  # static, known to every receiver: not sent
    numel: int


@dataclass(frozen=True)
class _Block:
    offset: int
    numel: int
    rows: int  # 0 for a block sent uncompressed
    cols: int


class PowerSGD(Compressor):
    """PowerSGD: rank-r approximation P Q^T of each matrix, two all-reduces, warm start"""

    name: ClassVar[str] = "powersgd"
    unbiased = False
    summable = True

    def __init__(self, rank: int = 2, power_iters: int = 1, seed: int = 0) -> None:
        require_int(rank, "powersgd: rank (e.g. rank=2)", at_least=1)
        require_int(power_iters, "powersgd: power_iters (e.g. power_iters=1)", at_least=1)
        self.rank = rank
        self.power_iters = power_iters
        self.seed = seed

    # --- layout ---------------------------------------------------------------------------

    def _blocks(self, state: dict[str, Any]) -> Iterator[_Block]:
        offset = 0
        for _, shape in state["layout"]:
            numel = 1
            for s in shape:
                numel *= s
            rows, cols = (shape[0], numel // shape[0]) if len(shape) >= 2 and numel else (0, 0)
            if rows and self.rank * (rows + cols) >= rows * cols:
                rows = cols = 0  # low rank would not save bytes: send as is
            yield _Block(offset, numel, rows, cols)
            offset += numel

    def init_state(self, numel: int, layout: Layout | None = None,
                   device: torch.device | str | None = None) -> dict[str, Any]:
        lay = [(str(n), tuple(int(s) for s in shape)) for n, shape in (layout or [])]
        if not lay:
            lay = [("flat", (numel,))]
        total = sum(torch.Size(s).numel() for _, s in lay)
        if total != numel:
            raise ConfigError(f"powersgd: the layout has {total} elements but the vector has "
                              f"{numel}; pass the model's (name, shape) list in flat order")
        state: dict[str, Any] = {"layout": lay, "q": []}
        gen = torch.Generator().manual_seed(self.seed)  # on the CPU: the same Q everywhere
        state["q"] = [draw(torch.randn, b.cols, self.rank, generator=gen, device=device)
                      for b in self._blocks(state) if b.rows]
        return state

    def _split(self, x: Tensor, state: dict[str, Any]) -> tuple[Tensor, list[Tensor]]:
        """The uncompressed entries (flat) and the matrices, as views into ``x``."""
        dense, mats = [], []
        for b in self._blocks(state):
            part = x[b.offset:b.offset + b.numel]
            if b.rows:
                mats.append(part.view(b.rows, b.cols))
            else:
                dense.append(part)
        flat = torch.cat(dense) if dense else x.new_zeros(0)
        return flat.float(), mats

    def _join(self, dense: Tensor, mats: list[Tensor], state: dict[str, Any]) -> Tensor:
        out, d, m = [], 0, 0
        for b in self._blocks(state):
            if b.rows:
                out.append(mats[m].reshape(-1))
                m += 1
            else:
                out.append(dense[d:d + b.numel])
                d += b.numel
        return torch.cat(out) if out else dense.new_zeros(0)

    # --- single worker --------------------------------------------------------------------

    def compress(self, x: Tensor, state: dict[str, Any],
                 generator: torch.Generator | None = None,
                 ) -> tuple[PowerSGDPayload, dict[str, Any]]:
        check_flat(x)
        dense, mats = self._split(x.detach(), state)
        ps, qs = [], []
        for m, q in zip(mats, state["q"], strict=True):
            m = m.float()
            for _ in range(self.power_iters):
                p = _orth(m @ q)
                q = m.T @ p
            ps.append(p)
            qs.append(q)
        payload = PowerSGDPayload(dense.clone(), ps, qs, state["layout"], x.numel())
        return payload, {**state, "q": qs}

    def decompress(self, payload: PowerSGDPayload) -> Tensor:
        mats = [p @ q.T for p, q in zip(payload.ps, payload.qs, strict=True)]
        return self._join(payload.dense, mats, {"layout": payload.layout})

    def nbytes(self, payload: PowerSGDPayload) -> int:
        return 4 * (payload.dense.numel() + sum(p.numel() for p in payload.ps)
                    + sum(q.numel() for q in payload.qs))

    # --- all-reduce protocol --------------------------------------------------------------

    def mean(self, x: Tensor, state: dict[str, Any],
             generator: torch.Generator | None = None) -> Program:
        """Sub-program: Algorithm 1 of the paper (see the module docstring). Its codec
        work is metered like compress/decompress (:mod:`relaxsgd.codec_meter`): ``x``
        encoded before the first all-reduce, decoded after the last."""
        check_flat(x)
        note(encoded=x.numel(), codec="powersgd")
        dense, mats = self._split(x.detach(), state)
        mats = [m.float() for m in mats]
        ps = [m @ q for m, q in zip(mats, state["q"], strict=True)]
        buf = torch.cat([dense] + [p.reshape(-1) for p in ps])
        got = yield AllReduce(buf, nbytes=4 * buf.numel())
        dense_mean = got[:dense.numel()]
        p_hats, off = [], dense.numel()
        for p in ps:
            p_hats.append(_orth(got[off:off + p.numel()].view_as(p)))
            off += p.numel()
        local_qs = [m.T @ p for m, p in zip(mats, p_hats, strict=True)]
        mean_qs = local_qs
        if local_qs:
            qbuf = torch.cat([q.reshape(-1) for q in local_qs])
            got_q = yield AllReduce(qbuf, nbytes=4 * qbuf.numel())
            mean_qs = list(torch.split(got_q, [q.numel() for q in local_qs]))
            mean_qs = [g.view_as(q) for g, q in zip(mean_qs, local_qs, strict=True)]
        mean = self._join(dense_mean, [p @ q.T for p, q in zip(p_hats, mean_qs, strict=True)],
                          state)
        own = self._join(dense.clone(), [p @ q.T for p, q in zip(p_hats, local_qs, strict=True)],
                         state)
        note(decoded=x.numel(), codec="powersgd")
        return mean, own, {**state, "q": [q.clone() for q in mean_qs]}


def _orth(p: Tensor) -> Tensor:
    """Orthonormal columns spanning (at least) the columns of ``p``: Householder QR, which
    stays orthonormal even when ``p`` is rank deficient (where Gram-Schmidt would divide by
    zero)."""
    return torch.linalg.qr(p, mode="reduced").Q
