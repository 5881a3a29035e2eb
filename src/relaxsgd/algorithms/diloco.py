"""DiLoCo and Streaming DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
Training of Language Models"; Douillard et al. 2025, "Streaming DiLoCo with overlapping
communication: Towards a Distributed Free Lunch").

DiLoCo. Every worker keeps the global model xg and the outer optimizer's momentum (both the
same everywhere: the outer step is replicated). A round: from xg, p inner steps with the
local optimizer reach y_i; the outer gradient Delta_i = xg - y_i is averaged (blocking;
optionally compressed with error feedback); the outer optimizer, SGD with Nesterov momentum
as in torch.optim.SGD, takes one step: buf <- mu buf + Delta, xg <- xg - outer_lr *
(Delta + mu buf) (or buf without Nesterov); every worker restarts from xg. Defaults from
the paper: outer_lr = 0.7, mu = 0.9, Nesterov. With outer_lr = 1 and mu = 0 this is Local
SGD (a test). Communication: one blocking aggregation per round. The inner optimizer is
the run's local optimizer (``train.optimizer``): the papers' AdamW on the ``shakespeare``
task, whose defaults select it; its moments stay local to each worker across rounds.

Streaming DiLoCo. The parameters are cut into ``fragments`` groups of whole tensors
(balanced by size, in flat order); fragment f is synchronised every p inner steps, the
fragments staggered by p / fragments steps, so that only one fragment travels at a time.
A sync of fragment f at step t sends the quantized outer gradient xg_f - x_f (default
``qsgd:bits=4``, no error feedback, as the paper's 4-bit outer gradients) and does not
wait: the worker keeps computing, and ``tau`` inner steps later it waits for the mean,
applies the outer step to xg_f and merges x_f <- alpha xg_f + (1 - alpha) x_f (the global
model's weight alpha; the paper mixes half and half). After the last inner step every
fragment with unsent progress is synchronised once more, everything in flight is applied,
and every worker ends on the global model. With tau = 0, alpha = 1, one fragment and no
compression this is DiLoCo (a test). A checkpoint (at the loop's top, between inner steps)
waits for the syncs in flight; each is still applied tau steps after it started.

Metrics: ``staleness`` (observation: tau, inner steps between a sync's start and its use),
``ef_residual_norm``, ``payload_bytes``.

Membership (issue 20, :mod:`relaxsgd.membership`): ``quorum``: every outer round's (or
fragment's) averaged update is taken among the workers present (weights 1/participants). A
departed worker's inner steps since the last outer step are lost. A (re)joiner takes its
donor's state: the outer model and the outer optimizer's momentum are the same on every
worker, so copying them is exact; the compression residual is the donor's own error and is
zeroed (:meth:`CompressedAlgorithm.adopt`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from ..checks import require_int
from ..errors import ConfigError
from ..state_tree import register_state_type
from ..tune.params import Choice, Float, Int
from .base import Checkpoint, Compute, Program, Worker
from .efsgd import CompressedAlgorithm, Pending, parse_compression


def _check_outer(who: str, p: int, outer_lr: float, outer_momentum: float) -> None:
    require_int(p, f"{who} option p (inner steps per round)", at_least=1)
    if not outer_lr > 0:
        raise ConfigError(f"{who} option outer_lr must be > 0, got {outer_lr}")
    if not 0.0 <= outer_momentum < 1.0:
        raise ConfigError(f"{who} option outer_momentum must be in [0, 1), "
                          f"got {outer_momentum}")


def outer_step(xg: Tensor, buf: Tensor, delta: Tensor, lr: float, mu: float,
               nesterov: bool) -> None:
    """One step of SGD with (Nesterov) momentum on xg with gradient delta, in place."""
    buf.mul_(mu).add_(delta)
    xg.sub_(delta + mu * buf if nesterov else buf, alpha=lr)


@dataclass(frozen=True)
class DiLoCoConfig:
    """p: inner steps per round (H in the paper); outer_lr: outer learning rate;
    outer_momentum: outer momentum mu; nesterov: Nesterov outer momentum; compressor: spec
    of the outer-gradient compressor (default ``identity``); error_feedback: keep its
    compression error for the next round."""

    p: int = 8
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    compressor: str = "identity"
    error_feedback: bool = True

    def __post_init__(self) -> None:
        _check_outer("diloco", self.p, self.outer_lr, self.outer_momentum)
        parse_compression("diloco", self.compressor, self.error_feedback, "allreduce", "")


class DiLoCo(CompressedAlgorithm):
    name = "diloco"
    Config = DiLoCoConfig
    search_space = {"p": Int(2, 500, log=True), "outer_lr": Float(0.1, 1.5, log=True),
                    "outer_momentum": Float(0.0, 0.95)}
    metric_keys = ("ef_residual_norm_mean", "payload_bytes")
    resumable = True

    def init_worker(self, w: Worker) -> None:
        super().init_worker(w)
        w.state["outer_buf"] = w.params.new_zeros(w.params.numel())

    def program(self, w: Worker) -> Program:
        # Every round ends with x = xg, so the round's start model is xg: the loop carries
        # nothing but w.state (outer momentum, compressor; the aggregation is blocking,
        # nothing is in flight at the loop top), and a resumed program goes on from it.
        cfg: DiLoCoConfig = self.cfg
        x = w.params
        while w.step < w.total_steps:
            yield Checkpoint()
            xg = x.clone()
            yield Compute(min(cfg.p, w.total_steps - w.step))
            got = yield from self.agg.mean(w, w.state["agg"], xg - x)
            outer_step(xg, w.state["outer_buf"], got.mean, cfg.outer_lr, cfg.outer_momentum,
                       cfg.nesterov)
            x.copy_(xg)


@dataclass(frozen=True)
class StreamingDiLoCoConfig:
    """p: inner steps between two syncs of a fragment; tau: inner steps between a sync's
    start and the use of its result (0 <= tau <= p); alpha: weight of the global model when
    merging, in (0, 1]; fragments: number of parameter groups synchronised in turn (p must
    be a multiple of it); outer_lr, outer_momentum, nesterov: the outer optimizer;
    compressor: spec of the outer-gradient compressor (default ``qsgd:bits=4``);
    error_feedback: keep its compression error for the next sync of the fragment."""

    p: int = 8
    tau: int = 1
    alpha: float = 0.5
    fragments: int = 1
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    compressor: str = "qsgd:bits=4"
    error_feedback: bool = False

    def __post_init__(self) -> None:
        who = "streaming-diloco"
        _check_outer(who, self.p, self.outer_lr, self.outer_momentum)
        require_int(self.tau, f"{who} option tau (with p={self.p})", 0, self.p)
        if not 0.0 < self.alpha <= 1.0:
            raise ConfigError(f"{who} option alpha must be in (0, 1], got {self.alpha}")
        if require_int(self.fragments, f"{who} option fragments", at_least=1) \
                and self.p % self.fragments:
            raise ConfigError(f"{who} option fragments must be a positive divisor of "
                              f"p={self.p}, got {self.fragments!r}")
        parse_compression(who, self.compressor, self.error_feedback, "allreduce", "")


@register_state_type
class _Sync(NamedTuple):
    apply_at: int
    frag: int
    pending: Pending


def fragment_bounds(layout: list, k: int) -> list[tuple[int, int, list]]:
    """``k`` contiguous groups of whole tensors, balanced by size: (start, end, layout)."""
    sizes = [int(shape.numel()) for _, shape in layout]
    if len(sizes) < k:
        raise ConfigError(f"streaming-diloco: fragments={k} but the model has only "
                          f"{len(sizes)} parameter tensors; use at most {len(sizes)}")
    total, out, start, i = sum(sizes), [], 0, 0
    for f in range(k):
        j, acc = i, 0
        target = total * (f + 1) / k
        while j < len(sizes) - (k - f - 1) and (j == i or start + acc + sizes[j] / 2 <= target):
            acc += sizes[j]
            j += 1
        out.append((start, start + acc, list(layout[i:j])))
        start, i = start + acc, j
    return out


class StreamingDiLoCo(CompressedAlgorithm):
    name = "streaming-diloco"
    Config = StreamingDiLoCoConfig
    search_space = {"p": Int(4, 128, log=True), "tau": Int(0, 8),
                    "fragments": Choice((1, 2, 4)), "outer_lr": Float(0.1, 1.5, log=True),
                    "outer_momentum": Float(0.0, 0.95)}
    metric_keys = ("staleness_mean", "ef_residual_norm_mean", "payload_bytes")
    resumable = True

    def init_worker(self, w: Worker) -> None:  # one aggregator state per fragment
        frags = fragment_bounds(w.layout, self.cfg.fragments)
        w.state["frags"] = [(a, b) for a, b, _ in frags]
        w.state["agg"] = [self.agg.init_state(b - a, lay, w.params.device)
                          for a, b, lay in frags]
        w.state["outer_buf"] = w.params.new_zeros(w.params.numel())
        w.state["xg"] = w.params.clone()  # the global model, the same on every worker
        w.state["flight"] = []  # the syncs started and not applied yet (_Sync), oldest first
        w.state["last_start"] = [0] * len(frags)  # step of each fragment's latest sync
        w.state["next_sync"] = 1  # the j-th sync (j >= 1) starts at step j * (p / fragments)

    def program(self, w: Worker) -> Program:
        # The loop's state is all in w.state (at a checkpoint the runtime waits for the
        # syncs in flight; their results are applied tau steps after they started, as in a
        # run without checkpoints), so a resumed program goes on from it. t is w.step.
        cfg: StreamingDiLoCoConfig = self.cfg
        st = w.state
        x, xg, flight, last_start = w.params, st["xg"], st["flight"], st["last_start"]
        every = cfg.p // cfg.fragments
        while True:
            t = w.step
            if t < w.total_steps:
                yield Checkpoint()
            while flight and flight[0].apply_at <= t:
                yield from self._apply(w, flight.pop(0), xg, cfg.alpha)
            j = st["next_sync"]
            if j * every < t or (flight and flight[0].apply_at < t):
                raise ConfigError(self._bad_state(t, j, flight))
            if t == j * every and t > 0:
                f = (j - 1) % len(last_start)
                yield from self._start(w, f, t, xg, flight)
                last_start[f], st["next_sync"] = t, j + 1
                if cfg.tau == 0:
                    yield from self._apply(w, flight.pop(0), xg, cfg.alpha)
            if t >= w.total_steps:
                break
            nxt = min(st["next_sync"] * every,
                      flight[0].apply_at if flight else w.total_steps, w.total_steps)
            yield Compute(nxt - t)
        for f in range(len(last_start)):
            if last_start[f] < t:
                yield from self._start(w, f, t, xg, flight)
        while flight:
            yield from self._apply(w, flight.pop(0), xg, cfg.alpha)
        x.copy_(xg)

    def _bad_state(self, t: int, j: int, flight: list[_Sync]) -> str:
        """Why a (resumed) state cannot go on; without this check it would loop forever."""
        late = flight[0].apply_at if flight else None
        return (f"streaming-diloco: inconsistent state at inner step {t}: next sync #{j} "
                f"was due at step {j * self.cfg.p // self.cfg.fragments}, oldest sync in "
                f"flight due at {late}; the checkpoint does not belong to this program "
                "(a sync is due at or after the current step)")

    def _start(self, w: Worker, f: int, t: int, xg: Tensor, flight: list[_Sync]) -> Program:
        a, b = w.state["frags"][f]
        pend = yield from self.agg.start(w, w.state["agg"][f], xg[a:b] - w.params[a:b])
        flight.append(_Sync(t + self.cfg.tau, f, pend))

    def _apply(self, w: Worker, sync: _Sync, xg: Tensor, alpha: float) -> Program:
        cfg: StreamingDiLoCoConfig = self.cfg
        a, b = w.state["frags"][sync.frag]
        got = yield from self.agg.receive(w, sync.pending)
        outer_step(xg[a:b], w.state["outer_buf"][a:b], got.mean, cfg.outer_lr,
                   cfg.outer_momentum, cfg.nesterov)
        w.params[a:b].mul_(1.0 - alpha).add_(xg[a:b], alpha=alpha)
        w.observe("staleness", cfg.tau)
