"""The parameter server of ``aggregation: ps``: one definition, run by both runtimes.

A :class:`ParameterServer` is pure math with explicit state: ``serve(state, payloads)``
takes the n workers' encoded messages of one round (by rank), decodes and averages them,
compresses the mean with the server's compressor and its own error feedback, and returns
the reply that every worker receives (the same one for all). Nothing here communicates: the
simulator (:mod:`relaxsgd.sim.engine`) runs it on a node of its network model with a link
of its own, the distributed runtime (:mod:`relaxsgd.distributed.server`) on a thread of
rank 0 that receives the uploads over the authenticated point-to-point transport. A worker
program reaches it with the :class:`~.base.ServerRound` effect; an algorithm names its
server with :meth:`~.base.Algorithm.server`.

Math (round k; C_s the server's compressor, E its error-feedback residual, E = 0 at start)::

    a   = (1/n) sum_i decompress(m_i^k)
    r^k = C_s(a + E);   E <- a + E - decompress(r^k)      (without error feedback: C_s(a))

so the replies telescope: sum_k decompress(r^k) = sum_k a^k - E. The random stream of C_s
(QSGD, random-k) is seeded from (run seed, salt SERVER, round k): a resumed server draws
what the uninterrupted one would have drawn.

With ``send_residual`` (OLCO3's ``server_compensation``) the reply also carries E after
the round, in full precision (billed: 4 d bytes more per reply).

The server's state is plain data (``{"ef": compressor state, "round": k}``), saved with
the run's checkpoints by the runtime that hosts it.

Compute charged by the simulator (:func:`server_seconds`): the server touches every float
of the n decoded messages, their sum, and the compressor's and error feedback's passes over
the mean, about ``(n + 3) d`` elements, at :data:`SECONDS_PER_ELEMENT` (1 ns: a
memory-bound loop streaming fp32 at ~4 GB/s on one core).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from .. import salts
from ..compress.base import Compressor
from ..compress.error_feedback import ErrorFeedback

SECONDS_PER_ELEMENT = 1e-9
# rounds past the next one to serve whose uploads a server keeps (rounds are pipelined: a
# worker is at most its staleness ahead of its last reply; this bounds what a faulty one
# can make the server hold, and an algorithm's staleness is checked against it)
MAX_ROUNDS_AHEAD = 64


def server_seconds(n: int, numel: int) -> float:
    """Virtual seconds the server computes for one round of n messages of ``numel``."""
    return SECONDS_PER_ELEMENT * (n + 3) * numel


def server_seed(seed: int, round_: int) -> int:
    """The seed of the server compressor's generator in round ``round_``."""
    return (seed * 1_000_003 + salts.SERVER * 7_919 + round_) % 2**62


class ParameterServer:
    """Average the workers' messages, compress the mean with error feedback (see module).

    ``inner``: the workers' compressor (to decode their messages); ``server``: the server's
    compressor; ``error_feedback``: the server keeps what it did not send; ``seed``: the
    run's seed; ``send_residual``: replies carry the residual after the round."""

    def __init__(self, inner: Compressor, server: Compressor, error_feedback: bool,
                 seed: int, send_residual: bool = False) -> None:
        self.inner, self.server = inner, server
        self.wire: Compressor = ErrorFeedback(server) if error_feedback else server
        self.error_feedback = error_feedback
        self.seed = seed
        self.send_residual = send_residual

    def init_state(self, numel: int, layout: list | None = None,
                   device: torch.device | str | None = None) -> dict[str, Any]:
        """The state before round 0 (``numel`` parameters, the workers' ``layout``), its
        tensors on ``device`` (where the server computes: the workers' device)."""
        self._probe, _ = self.inner.compress(torch.zeros(numel, device=device),
                                             self.inner.init_state(numel, layout, device),
                                             torch.Generator().manual_seed(0))
        return {"ef": self.wire.init_state(numel, layout, device), "round": 0}

    def check(self, payload: Any) -> None:
        """ValueError unless ``payload`` is a message of this run's workers: the same form
        as the workers' compressor makes (types, tensor shapes and dtypes, integers: sizes
        do not depend on the values), checked before it is decoded (a hostile size would
        allocate), and decodable to the model's size. Call :meth:`init_state` first."""
        if not _same_form(payload, self._probe):
            raise ValueError(f"a {type(payload).__name__} that is not of the form of the "
                             f"workers' {type(self._probe).__name__} messages")
        try:
            dense = self.inner.decompress(payload)
        except (IndexError, RuntimeError) as e:
            raise ValueError(f"it does not decode ({e})"[:300]) from None
        if dense.shape != self.inner.decompress(self._probe).shape:
            raise ValueError(f"it decodes to shape {tuple(dense.shape)}")

    def serve(self, state: dict[str, Any], payloads: list[Any]) -> Any:
        """One round: the reply to every worker, given their messages by rank. Advances
        ``state`` in place (its residual and round)."""
        agg = torch.stack([self.inner.decompress(p) for p in payloads]).mean(0)
        gen = torch.Generator().manual_seed(server_seed(self.seed, int(state["round"])))
        state["round"] = int(state["round"]) + 1
        reply, state["ef"] = self.wire.compress(agg, state["ef"], gen)
        if self.send_residual:
            return (reply, self.residual(state).clone())
        return reply

    def residual(self, state: dict[str, Any]) -> Tensor | None:
        """E, what the server's compression has held back so far (None without EF)."""
        return state["ef"]["residual"] if self.error_feedback else None

    def decode(self, reply: Any) -> tuple[Tensor, Tensor | None]:
        """What a worker makes of a reply: (the decoded mean, the residual E it carries or
        None)."""
        if self.send_residual:
            msg, res = reply
            return self.server.decompress(msg), res
        return self.server.decompress(reply), None

    def reply_nbytes(self, numel: int, layout: list | None = None,
                     device: torch.device | str | None = None) -> int:
        """Bytes of one reply on the wire (the sizes do not depend on the values)."""
        probe, _ = self.server.compress(torch.zeros(numel, device=device),
                                        self.server.init_state(numel, layout, device),
                                        torch.Generator().manual_seed(0))
        return self.server.nbytes(probe) + (4 * numel if self.send_residual else 0)


def _same_form(x: Any, ref: Any, depth: int = 0) -> bool:
    """``x`` has the form of ``ref``: types, tensor shapes and dtypes, ints and strings
    equal (floats may differ)."""
    if depth > 8:
        return False
    if isinstance(ref, Tensor):
        return isinstance(x, Tensor) and x.shape == ref.shape and x.dtype == ref.dtype
    if type(x) is not type(ref):
        return False
    if dataclasses.is_dataclass(ref):
        return all(_same_form(getattr(x, f.name), getattr(ref, f.name), depth + 1)
                   for f in dataclasses.fields(ref))
    if isinstance(ref, (list, tuple)):
        return len(x) == len(ref) and all(_same_form(a, b, depth + 1)
                                          for a, b in zip(x, ref, strict=True))
    if isinstance(ref, dict):
        return x.keys() == ref.keys() and all(_same_form(x[k], ref[k], depth + 1)
                                              for k in ref)
    if isinstance(ref, float):
        return True
    return bool(x == ref)
