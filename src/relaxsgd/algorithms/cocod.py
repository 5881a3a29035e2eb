"""CoCoD-SGD (Shen, Xu, Liu, Wang & Zhu, IJCAI 2019, "Faster Distributed Deep Net Training:
Computation and Communication Decoupled Stochastic Gradient Descent").

Math: at the start of round k every worker starts averaging its model x_i^k in the
background and runs p local steps meanwhile, reaching y_i; at the round's end
x_i^(k+1) = mean_j x_j^k + (y_i - x_i^k): the (one round stale) average plus the worker's
own progress. It is OLCO3 with s = 1, no compression and staleness compensation only (a
test). After the last round (``final_average``) the models are averaged once, blocking.

Compression (an extension, so that the family compares at equal compression): what travels
is the difference of the round-start model to the last average every worker knows,
x_i^k - xbar^(k-1) (xbar^(-1) = x^0), compressed with ``compressor`` and error feedback; the
average is then xbar^k = xbar^(k-1) + mean_i m_i. With ``identity`` (the default) this is
the paper's model average exactly. ``aggregation: ps`` sends the messages through a
parameter server with its own compression (see ``efsgd``) instead of the exact mean.

Communication schedule: one non-blocking aggregation per round, started before the local
steps and waited for after them: no stall when it takes less than a round.

Metrics: ``staleness`` (observation: steps between the average's start and its use, p),
``ef_residual_norm``, ``payload_bytes``.

Membership (issue 20, :mod:`relaxsgd.membership`): ``quorum``: each round's background model
average is taken among the workers present (weights 1/participants); a (re)joiner takes its
donor's model and state and zeroes the donor's residual.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import require_int
from ..tune.params import Int
from .base import AllReduce, Checkpoint, Compute, Program, Worker
from .efsgd import CompressedAlgorithm, CompressionOptions


@dataclass(frozen=True)
class CoCoDConfig(CompressionOptions):
    """The compression options (:class:`~relaxsgd.algorithms.efsgd.CompressionOptions`:
    compressor, error_feedback, aggregation, server_compressor, server_error_feedback);
    compressor: spec of the compressor of the round-start model difference (default
    ``identity``: the plain model average); error_feedback: keep the compression error for
    the next round; p: local steps per round; final_average: average the models once,
    blocking, after the last round."""

    compressor: str = "identity"
    p: int = 4
    final_average: bool = True

    def __post_init__(self) -> None:
        require_int(self.p, "cocod option p (local steps per round)", at_least=1)
        self.check_compression("cocod")


class CoCoDSGD(CompressedAlgorithm):
    name = "cocod"
    Config = CoCoDConfig
    search_space = {"p": Int(1, 64, log=True)}
    metric_keys = ("staleness_mean", "ef_residual_norm_mean", "payload_bytes")
    resumable = True

    def init_worker(self, w: Worker) -> None:
        super().init_worker(w)
        w.state["ref"] = w.params.clone()  # xbar^(k-1): the last average, known to all

    def program(self, w: Worker) -> Program:
        # the loop's state is all in w.state (a round's aggregation is received within
        # the round: nothing is in flight at the loop top), so a resumed program goes on
        x, ref = w.params, w.state["ref"]
        while w.step < w.total_steps:
            yield Checkpoint()
            h = min(self.cfg.p, w.total_steps - w.step)
            start = x.clone()
            pend = yield from self.agg.start(w, w.state["agg"], start - ref)
            yield Compute(h)
            got = yield from self.agg.receive(w, pend)
            ref.add_(got.mean)
            x.copy_(ref + (x - start))
            w.observe("staleness", h)
        if self.cfg.final_average:
            avg = yield AllReduce(x.clone())
            x.copy_(avg)
