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
that delivers an aggregation within s steps of computation it never stalls. A checkpoint
(at a step's start) waits for the s aggregations in flight, then applies them on schedule.

Metrics: ``staleness`` (observation: s, in local steps), ``ef_residual_norm``,
``payload_bytes``.

Membership (issue 20, :mod:`relaxsgd.membership`): ``quorum``: each step's (stale) gradient
mean is taken among the workers present (weights 1/participants); a departed worker's
gradients still in flight are lost, a (re)joiner takes its donor's model and pipeline state
(the aggregates in flight are everyone's) and zeroes the donor's residual.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import require_int
from ..tune.params import Int
from .base import Checkpoint, Grad, Program, Wait, Worker
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
    search_space = {"s": Int(0, 4)}
    metric_keys = ("staleness_mean", "ef_residual_norm_mean", "payload_bytes")
    resumable = True

    def init_worker(self, w: Worker) -> None:
        super().init_worker(w)
        # w.step counts applied gradients, s behind the gradients computed: count those
        w.state["grads"] = 0
        w.state["flight"] = []  # the aggregations started and not applied (Pending), oldest first

    def program(self, w: Worker) -> Program:
        # the loop's state is all in w.state (at a checkpoint the runtime waits for the
        # aggregations in flight), so a resumed program goes on from it
        flight = w.state["flight"]
        while w.state["grads"] < w.total_steps:
            yield Checkpoint()
            g = yield Grad()
            w.state["grads"] += 1
            flight.append((yield from self.agg.start(w, w.state["agg"], g)))
            if len(flight) > self.cfg.s:
                got = yield from self.agg.receive(w, flight.pop(0))
                w.apply_grad(got.mean)
                w.observe("staleness", self.cfg.s)
        while flight:  # the aggregates still in flight: applied, not observed
            got = yield Wait(flight.pop(0).handle)
            w.apply_grad(got.mean)
