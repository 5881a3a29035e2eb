"""Overlap-Local-SGD (Wang, Liang & Joshi, ICASSP 2020, "Overlap Local-SGD: An Algorithmic
Approach to Hide Communication Delays in Distributed SGD").

Math. Every worker keeps an anchor model z (the same everywhere; z^0 = x^0) and the anchor's
momentum vbar. After p local steps, worker i is pulled towards the stale anchor,
x_i <- (1 - alpha) x_i + alpha z^k, and, in the background, the anchor moves with momentum:
v_i <- beta v_i + (x_i - z^k), z^(k+1) = z^k + mean_i v_i (since every v_i starts at zero
and the mean is linear, the workers keep vbar = mean_i v_i, identical everywhere).
Defaults from the authors: alpha = 0.6, beta = 0.7. DECIDED (option ``anchor_from``): the
anchor averages the pulled models (``pulled``, the reading of ALGORITHMS.md) or the models
before the pull (``local``).

Communication schedule: at the end of round k a worker waits for the anchor z^k (the
aggregation started at the end of round k - 1, which had a whole round to arrive), pulls,
and starts the aggregation of x_i - z^k for z^(k+1). What travels is that difference to the
anchor, compressed with ``compressor`` and error feedback (an extension for comparisons at
equal compression; ``identity``, the default, is the paper's model average; ``aggregation:
ps`` uses a parameter server with its own compression, see ``efsgd``). After the last
round the last anchor is received and ``final`` decides the models: ``average`` (one
blocking model average), ``anchor`` (every worker takes z) or ``none``. A checkpoint (at a
round's start) waits for the anchor in flight; it is still used at the round's end.

Metrics: ``staleness`` (observation: steps between the anchor's information and its use),
``ef_residual_norm``, ``payload_bytes``.

Membership (issue 20, :mod:`relaxsgd.membership`): ``quorum``: each anchor average is taken
among the workers present (weights 1/participants); a (re)joiner takes its donor's model and
anchor and zeroes the donor's residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..checks import require_int
from ..errors import ConfigError
from ..tune.params import Float, Int
from .base import AllReduce, Checkpoint, Compute, Program, Worker
from .efsgd import CompressedAlgorithm, CompressionOptions

FINALS = ("average", "anchor", "none")


@dataclass(frozen=True)
class OverlapLocalConfig(CompressionOptions):
    """The compression options (:class:`~relaxsgd.algorithms.efsgd.CompressionOptions`:
    compressor, error_feedback, aggregation, server_compressor, server_error_feedback);
    compressor: spec of the compressor of x_i - z (default ``identity``); error_feedback:
    keep the compression error for the next round; p: local steps per round; alpha: pull
    towards the anchor, in [0, 1]; beta: anchor momentum, in [0, 1); anchor_from:
    ``pulled`` or ``local`` (which model the anchor averages); final: ``average``,
    ``anchor`` or ``none`` (the models after the last round)."""

    compressor: str = "identity"
    p: int = 4
    alpha: float = 0.6
    beta: float = 0.7
    anchor_from: str = "pulled"
    final: str = "average"

    def __post_init__(self) -> None:
        require_int(self.p, "overlap-local option p (local steps per round)", at_least=1)
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"overlap-local option alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"overlap-local option beta must be in [0, 1), got {self.beta}")
        if self.anchor_from not in ("pulled", "local"):
            raise ConfigError(f"overlap-local option anchor_from={self.anchor_from!r}; "
                              "choose one of: pulled, local")
        if self.final not in FINALS:
            raise ConfigError(f"overlap-local option final={self.final!r}; choose one of: "
                              f"{', '.join(FINALS)}")
        self.check_compression("overlap-local")


class OverlapLocalSGD(CompressedAlgorithm):
    name = "overlap-local"
    Config = OverlapLocalConfig
    search_space = {"p": Int(1, 64, log=True), "alpha": Float(0.0, 1.0),
                    "beta": Float(0.0, 0.95)}
    metric_keys = ("staleness_mean", "ef_residual_norm_mean", "payload_bytes")
    resumable = True

    def init_worker(self, w: Worker) -> None:
        super().init_worker(w)
        w.state["z"] = w.params.clone()  # the anchor z^k, the same on every worker
        w.state["vbar"] = w.params.new_zeros(w.params.numel())  # the anchor's momentum
        w.state["pend"] = None  # the aggregation for the next anchor (a Pending), in flight

    def program(self, w: Worker) -> Program:
        # the loop's state is all in w.state (at a checkpoint the runtime waits for the
        # aggregation in flight), so a resumed program goes on from it
        cfg: OverlapLocalConfig = self.cfg
        x, z, vbar = w.params, w.state["z"], w.state["vbar"]
        while w.step < w.total_steps:
            yield Checkpoint()
            h = min(cfg.p, w.total_steps - w.step)
            yield Compute(h)
            if w.state["pend"] is not None:
                yield from self._receive(w, w.state["pend"], z, vbar)
                w.observe("staleness", h)
            local = x - z
            x.mul_(1.0 - cfg.alpha).add_(z, alpha=cfg.alpha)
            msg = local if cfg.anchor_from == "local" else x - z
            w.state["pend"] = yield from self.agg.start(w, w.state["agg"], msg)
        if w.state["pend"] is not None:
            yield from self._receive(w, w.state["pend"], z, vbar)
            w.state["pend"] = None
        if cfg.final == "average":
            x.copy_((yield AllReduce(x.clone())))
        elif cfg.final == "anchor":
            x.copy_(z)

    def _receive(self, w: Worker, pend: Any, z: Any, vbar: Any) -> Program:
        got = yield from self.agg.receive(w, pend)
        vbar.mul_(self.cfg.beta).add_(got.mean)
        z.add_(vbar)
