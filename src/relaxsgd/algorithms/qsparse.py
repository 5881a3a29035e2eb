"""Qsparse-local-SGD (Basu, Data, Karakus & Diggavi, NeurIPS 2019, "Qsparse-local-SGD:
Distributed SGD with Quantization, Sparsification, and Local Computations").

Math. Every worker keeps the shared model xg (the same everywhere). A round: from xg, p local
steps reach y_i; the update u_i = xg - y_i is compressed with error feedback
(v = u_i + e_i; m_i = C(v); e_i <- v - m_i); the messages are aggregated and every worker
sets x_i = xg <- xg - mean_i m_i. With ``compressor: identity`` this is Local SGD; it is
OLCO3 with s = 0 and no compression compensation (a test).

Communication schedule: one blocking aggregation per round, after the local steps:
``aggregation: allreduce`` gives the exact mean of the decoded messages (an all-reduce for
summable compressors, PowerSGD's two all-reduces, an all-gather for top-k, sign, QSGD);
``aggregation: ps`` goes through a parameter server (the paper's master), whose reply is
compressed by ``server_compressor`` with its own error feedback (a real server, see
``efsgd`` and ``server``).

Metrics: ``ef_residual_norm`` (observation), ``payload_bytes`` (counter).

Membership (issue 20, :mod:`relaxsgd.membership`): ``quorum``: each round's compressed
average is taken among the workers present (weights 1/participants). The error-feedback
residual of a departed worker is DROPPED: it is what that worker's compression held back,
and no one else can send it; a (re)joiner takes its donor's model and zeroes the residual it
copied (the donor still holds that error and will send it: copied, it would be applied
twice).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import require_int
from ..tune.params import Choice, Int
from .base import Checkpoint, Compute, Program, Worker
from .efsgd import CompressedAlgorithm, CompressionOptions


@dataclass(frozen=True)
class QsparseConfig(CompressionOptions):
    """The compression options (:class:`~relaxsgd.algorithms.efsgd.CompressionOptions`:
    compressor, error_feedback, aggregation, server_compressor, server_error_feedback);
    compressor: spec of the update compressor (default ``topk:ratio=0.01``; ``sign``,
    ``qsgd:bits=4``, ``powersgd:rank=2``, ...); error_feedback: keep the compression error
    for the next round; p: local steps per round."""

    p: int = 4

    def __post_init__(self) -> None:
        require_int(self.p, "qsparse option p (local steps per round)", at_least=1)
        self.check_compression("qsparse")


class QsparseLocalSGD(CompressedAlgorithm):
    name = "qsparse"
    Config = QsparseConfig
    search_space = {"p": Int(1, 64, log=True),
                    "compressor": Choice(("topk:ratio=0.001", "topk:ratio=0.01",
                                          "topk:ratio=0.1"))}
    metric_keys = ("ef_residual_norm_mean", "payload_bytes")
    resumable = True

    def program(self, w: Worker) -> Program:
        # Every round ends with x = xg, so the round's start model is xg: the loop carries
        # nothing but w.state["agg"] (the aggregation is blocking, nothing is in flight at
        # the loop top), and a resumed program goes on from it.
        x = w.params
        while w.step < w.total_steps:
            yield Checkpoint()
            xg = x.clone()
            yield Compute(min(self.cfg.p, w.total_steps - w.step))
            got = yield from self.agg.mean(w, w.state["agg"], xg - x)
            xg.sub_(got.mean)
            x.copy_(xg)
