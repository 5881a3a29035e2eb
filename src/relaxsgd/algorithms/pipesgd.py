"""Pipe-SGD (Li, Yu, Li, Avestimehr, Kim & Schwing, NeurIPS 2018, "Pipe-SGD: A Decentralized
Pipelined SGD Framework for Distributed Deep Net Training").

Math: w_(t+1) = w_t - eta * mean_i g_i(w_(t-s)): the gradient computed at step t is applied
s steps later, so its aggregation overlaps the next s steps of computation. The first s
steps apply nothing (no aggregate has arrived yet); after the last gradient the s
aggregates still in flight are applied (the run does exactly its local steps' worth of
updates). With ``s = 0`` this is all-reduce SGD; it is OLCO3 with p = 1 and no compensation
(a test). Optionally the gradients are compressed (``compressor``, with error feedback in
gradient units), as the paper's truncation does; momentum and weight decay act on the
applied mean through the local optimizer.

Communication schedule: a non-blocking aggregation per step, run in FIFO order on the
communication thread; the worker waits only for the aggregate of step t - s. With a network
that delivers an aggregation within s steps of computation it never stalls.

Metrics: ``staleness`` (observation: s, in local steps), ``ef_residual_norm``,
``payload_bytes``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from ..checks import require_int
from .base import Grad, Program, Wait, Worker
from .efsgd import CompressedAlgorithm, CompressionOptions


@dataclass(frozen=True)
class PipeSGDConfig(CompressionOptions):
    """The compression options (:class:`~relaxsgd.algorithms.efsgd.CompressionOptions`:
    compressor, error_feedback, aggregation, server_compressor, server_error_feedback);
    compressor: spec of the gradient compressor (default ``identity``: none);
    error_feedback: keep the compression error for the next gradient; s: staleness in steps
    (the gradient of step t is applied at step t + s)."""

    compressor: str = "identity"
    s: int = 1

    def __post_init__(self) -> None:
        require_int(self.s, "pipesgd option s (staleness in steps)", at_least=0)
        self.check_compression("pipesgd")


class PipeSGD(CompressedAlgorithm):
    name = "pipesgd"
    Config = PipeSGDConfig
    metric_keys = ("staleness_mean", "ef_residual_norm_mean", "payload_bytes")

    def program(self, w: Worker) -> Program:
        flight: deque = deque()
        for _ in range(w.total_steps):
            g = yield Grad()
            flight.append((yield from self.agg.start(w, w.state["agg"], g)))
            if len(flight) > self.cfg.s:
                got = yield from self.agg.receive(w, flight.popleft())
                w.apply_grad(got.mean)
                w.observe("staleness", self.cfg.s)
        while flight:  # the aggregates still in flight: applied, not observed
            got = yield Wait(flight.popleft().handle)
            w.apply_grad(got.mean)
