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
compressed by ``server_compressor`` with its own error feedback; the server's computation is
replicated on every worker, costed as a real server would be (see ``efsgd``).

Metrics: ``ef_residual_norm`` (observation), ``payload_bytes`` (counter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .base import Algorithm, Compute, Program, Worker
from .efsgd import make_aggregator, observe_residual, parse_compression


@dataclass(frozen=True)
class QsparseConfig:
    """p: local steps per round; compressor: spec of the update compressor
    (``topk:ratio=0.01``, ``sign``, ``qsgd:bits=4``, ``powersgd:rank=2``, ...);
    error_feedback: keep the compression error for the next round; aggregation:
    ``allreduce`` or ``ps``; server_compressor: the server's reply compressor in ps mode
    (empty: the workers' one); server_error_feedback: the server's own error feedback."""

    p: int = 4
    compressor: str = "topk:ratio=0.01"
    error_feedback: bool = True
    aggregation: str = "allreduce"
    server_compressor: str = ""
    server_error_feedback: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.p, int) or self.p < 1:
            raise ConfigError(f"qsparse option p (local steps per round) must be >= 1, "
                              f"got {self.p!r}")
        parse_compression("qsparse", self.compressor, self.error_feedback, self.aggregation,
                          self.server_compressor)


class QsparseLocalSGD(Algorithm):
    name = "qsparse"
    Config = QsparseConfig
    metric_keys = ("ef_residual_norm_mean", "payload_bytes")

    def __init__(self, cfg: Any, info: Any) -> None:
        super().__init__(cfg, info)
        self.agg = make_aggregator(self.name, cfg, info.seed)

    def init_worker(self, w: Worker) -> None:
        w.state["agg"] = self.agg.init_state(w.params.numel(), w.layout)

    def program(self, w: Worker) -> Program:
        x = w.params
        xg = x.clone()
        done = 0
        while done < w.total_steps:
            h = min(self.cfg.p, w.total_steps - done)
            yield Compute(h)
            done += h
            got = yield from self.agg.mean(w, w.state["agg"], xg - x)
            xg.sub_(got.mean)
            x.copy_(xg)
            observe_residual(w, got.residual)
