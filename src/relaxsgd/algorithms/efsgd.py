"""EF-SGD: all-reduce SGD with any compressor and error feedback (Seide et al. 2014;
Karimireddy et al., ICML 2019, "Error Feedback Fixes SignSGD and other Gradient Compression
Schemes"; Vogels et al. 2019 for PowerSGD), and the compressed aggregation every algorithm of
the OLCO3 family uses (:class:`Aggregator`).

Math. Every step worker i computes a stochastic gradient g_i, forms p_i = g_i + e_i,
sends m_i = C(p_i), keeps e_i <- p_i - m_i, and applies the mean of the messages,
mbar = (1/n) sum_i m_i, with its local optimizer (momentum and weight decay act on mbar, as
in the PowerSGD paper). DECIDED (option-free, documented): the residual lives in gradient
units; with a constant learning rate this is exactly EF-SGD's p_i = eta g_i + e_i scaled by
1/eta. With ``compressor: identity`` this is all-reduce SGD, exactly (a test).

Communication schedule: one blocking aggregation per step. ``aggregation: allreduce`` (the
default) gives every worker the exact mean of the decoded messages: one ring all-reduce for
summable compressors (identity, fp16, bf16, random-k with a shared seed), PowerSGD's own two
all-reduces, or a ring all-gather of the payloads otherwise (top-k, sign, QSGD: their
messages cannot be summed). ``aggregation: ps`` goes through a parameter server: workers
upload their payloads, the server averages them, compresses the mean with
``server_compressor`` (default: the workers' compressor) and its own error feedback
(``server_error_feedback``), and sends that reply to every worker. The server is real
(:mod:`.server`: one definition; a node with its own link in the simulator, a thread of
rank 0 in the distributed runtime): its state lives there, not on the workers.

Bytes are those of the encoded payloads (``Compressor.nbytes``); the counter
``payload_bytes`` adds up the size of every message a worker contributes (32 bits per
parameter per step for uncompressed all-reduce SGD), beside the standard traffic columns.
Observation ``ef_residual_norm``: the L2 norm of the worker's residual after each message.

Membership (issue 20, :mod:`relaxsgd.membership`): ``quorum``: every aggregation (all-
reduce, all-gather or server round) is taken among the workers present (weights
1/participants; an all-gather's missing payloads are None and skipped; the server averages
the uploads it got). A departed worker's error-feedback residual is DROPPED (only it could
send what its compression held back). A (re)joiner takes its donor's state and zeroes the
residual it copied: it is the donor's own error, which the donor will still send (copied, it
would count twice); the server's state is the server's and does not move.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..compress.base import Compressor
from ..compress.error_feedback import ErrorFeedback
from ..compress.spec import make_compressor
from ..errors import ConfigError
from ..requires import Needs, check_needs
from ..state_tree import register_state_type
from .base import (
    Algorithm,
    AllGather,
    AllReduce,
    Checkpoint,
    Grad,
    Handle,
    Program,
    ServerRound,
    Spawn,
    Wait,
    Worker,
)
from .server import ParameterServer

AGGREGATIONS = ("allreduce", "ps")


@register_state_type
class Delivered(NamedTuple):
    """What a finished aggregation gives: the aggregate, this worker's own decoded message,
    its error-feedback residual after the message (None without error feedback), and in ps
    mode with ``server_compensation`` the server's residual after this round (what the
    server's compression has held back so far, billed on the downlink; None otherwise)."""

    mean: Tensor
    own: Tensor
    residual: Tensor | None
    server_residual: Tensor | None = None


@register_state_type
class Pending(NamedTuple):
    """A started aggregation. ``own``/``residual`` are known at once when the compressor
    works locally, else None until the handle's :class:`Delivered` says."""

    handle: Handle
    own: Tensor | None
    residual: Tensor | None


def parse_compression(who: str, compressor: str, error_feedback: bool, aggregation: str,
                      server_compressor: str) -> tuple[Compressor, bool, Compressor | None]:
    """(inner compressor, error feedback on, server compressor or None); ConfigError if bad.

    ``ef(<spec>)`` in the spec turns error feedback on, whatever ``error_feedback`` says.
    """
    if not isinstance(compressor, str):
        raise ConfigError(f"{who} option compressor must be a spec string such as "
                          f"'topk:ratio=0.01', got {compressor!r}")
    comp = make_compressor(compressor)
    ef = bool(error_feedback)
    if isinstance(comp, ErrorFeedback):
        comp, ef = comp.inner, True
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"{who} option aggregation={aggregation!r}; choose one of: "
                          f"{', '.join(AGGREGATIONS)}")
    server = None
    if aggregation == "ps":
        server = make_compressor(server_compressor or compressor)
        if isinstance(server, ErrorFeedback):
            server = server.inner
    return comp, ef, server


def uses_protocol(c: Compressor) -> bool:
    """True when the compressor aggregates with its own protocol (PowerSGD), so a worker
    learns its own decoded message only after communicating."""
    return type(c).mean is not Compressor.mean


class Aggregator:
    """Compressed aggregation with error feedback, started non-blocking from a worker program.

    Per-worker state lives in a dict of tensors and ints (``init_state``; checkpointable):
    the compressor's (with the error-feedback residual); in ps mode the server's state is
    the server's own (:attr:`ps`, hosted by the runtime). An aggregation of one collective
    (all-reduce, or all-gather without a server) starts at once, so several are in flight
    together (each spawn runs on its own process group in the distributed runtime) and s
    rounds of staleness can hide an aggregation up to s rounds long; a server round (its
    state advances round by round) or one of several collectives (PowerSGD's protocol) is
    chained behind the worker's previous one (FIFO), so that every worker issues them in
    the same order.
    """

    def __init__(self, inner: Compressor, error_feedback: bool, aggregation: str = "allreduce",
                 server: Compressor | None = None, server_error_feedback: bool = True,
                 seed: int = 0, server_compensation: bool = False) -> None:
        self.inner = inner
        self.ef = error_feedback
        self.wire: Compressor = ErrorFeedback(inner) if error_feedback else inner
        self.mode = aggregation
        self.protocol = aggregation == "allreduce" and uses_protocol(inner)
        self.server = server
        # ps: the server (the runtime hosts it); with server_compensation its residual
        # travels with every reply (dense float32, billed)
        self.ps = (ParameterServer(inner, server, server_error_feedback, seed,
                                   server_compensation) if server is not None else None)
        # Per worker: its latest aggregation, for the FIFO chain. Not checkpointed, on
        # purpose: at a checkpoint every spawn has finished (the runtime waits for the
        # handles in w.state and refuses to save with a spawn running), and waiting for a
        # finished handle returns at once, so the empty dict of a resumed run behaves
        # exactly like the finished handle it replaces.
        self._last: dict[int, Handle | None] = {}

    # ps rounds one after another whatever the runtime (a subclass whose rounds cannot be
    # pipelined: the tests' replicated emulation of the server, round by round on every
    # worker)
    ordered_rounds = False

    # -- state -------------------------------------------------------------------------
    def init_state(self, numel: int, layout: list | None,
                   device: torch.device | str | None = None) -> dict[str, Any]:
        """The state of one worker's aggregations, its tensors on ``device`` (the worker's)."""
        st: dict[str, Any] = {"comp": self.wire.init_state(numel, layout, device)}
        probe, _ = self.inner.compress(torch.zeros(numel, device=device),
                                       self.inner.init_state(numel, layout, device),
                                       torch.Generator().manual_seed(0))
        st["msg_nbytes"] = self.inner.nbytes(probe)  # sizes do not depend on the values
        if self.ps is not None:
            st["down_nbytes"] = self.ps.reply_nbytes(numel, layout, device)
            st["round"] = 0  # server rounds started (their numbers, in program order)
        return st

    def residual(self, st: dict[str, Any]) -> Tensor | None:
        return st["comp"]["residual"] if self.ef else None

    def forget(self, rank: int) -> None:
        """Drop worker ``rank``'s FIFO chain (it was handed a new state, issue 20)."""
        self._last.pop(rank, None)

    # -- aggregation -------------------------------------------------------------------
    def start(self, w: Worker, st: dict[str, Any], x: Tensor) -> Program:
        """Sub-program: start aggregating ``x`` (not modified); returns a :class:`Pending`."""
        prev = self._last.get(w.rank)
        if self.protocol:
            w.count("payload_bytes", st["msg_nbytes"])
            h = yield Spawn(self._protocol(w, st, x.detach().clone(), prev))
            pend = Pending(h, None, None)
        else:
            payload, st["comp"] = self.wire.compress(x.detach(), st["comp"], w.rng)
            own = self.wire.decompress(payload)
            nb = self.wire.nbytes(payload)
            w.count("payload_bytes", nb)
            res = self.residual(st)
            res = None if res is None else res.clone()
            # Server rounds are pipelined: round k+1's upload leaves when it is ready, not
            # after round k's reply (the server serves them in order; each carries its
            # number). Under churn / in an elastic job the runtime asks for one round at
            # a time (w.ordered_server_rounds): quorum rounds are formed one after another.
            ordered = getattr(w, "ordered_server_rounds", False) or self.ordered_rounds
            chain = prev if self.mode == "ps" and ordered else None
            rnd = st.get("round")  # its number (None: the state of an older checkpoint)
            if rnd is not None:
                st["round"] = rnd + 1
                if chain is not None:  # one at a time: the runtime counts them, as before
                    rnd = None
            h = yield Spawn(self._send(st, payload, own, res, nb, chain, rnd))
            pend = Pending(h, own, res)
        self._last[w.rank] = pend.handle
        return pend

    def receive(self, w: Worker, pend: Pending) -> Program:
        """Sub-program: wait for a started aggregation and observe the residual it left
        (``ef_residual_norm``, with error feedback); returns its :class:`Delivered`."""
        got = yield Wait(pend.handle)
        if got.residual is not None:
            w.observe("ef_residual_norm", float(got.residual.norm()))
        return got

    def mean(self, w: Worker, st: dict[str, Any], x: Tensor) -> Program:
        """Sub-program: the blocking aggregation of ``x`` (:meth:`start`, then
        :meth:`receive`); returns a :class:`Delivered`."""
        pend = yield from self.start(w, st, x)
        return (yield from self.receive(w, pend))

    def _send(self, st: dict[str, Any], payload: Any, own: Tensor, res: Tensor | None,
              nb: int, prev: Handle | None, rnd: int | None = None) -> Program:
        if prev is not None:
            yield Wait(prev)
        if self.ps is not None:
            reply = yield ServerRound(payload, nb, st["down_nbytes"], round=rnd)
            mean, server_res = self.ps.decode(reply)
            return Delivered(mean, own, res, server_res)
        if self.inner.summable:
            mean = yield AllReduce(own, nbytes=nb)
        else:
            payloads = yield AllGather(payload, nbytes=nb)
            # under churn the payloads of non-participants are None (a quorum round)
            mean = torch.stack([self.inner.decompress(p) for p in payloads
                                if p is not None]).mean(0)
        return Delivered(mean, own, res)

    def _protocol(self, w: Worker, st: dict[str, Any], x: Tensor, prev: Handle | None
                  ) -> Program:
        if prev is not None:
            yield Wait(prev)
        mean, own, st["comp"] = yield from self.wire.mean(x, st["comp"], w.rng)
        res = self.residual(st)
        return Delivered(mean, own, None if res is None else res.clone())


def make_aggregator(who: str, cfg: Any, seed: int) -> Aggregator:
    """The aggregator a config with compressor / error_feedback (/ aggregation, server_*)
    options describes."""
    agg = getattr(cfg, "aggregation", "allreduce")
    inner, ef, server = parse_compression(who, cfg.compressor, cfg.error_feedback, agg,
                                          getattr(cfg, "server_compressor", ""))
    return Aggregator(inner, ef, agg, server, getattr(cfg, "server_error_feedback", True), seed,
                      getattr(cfg, "server_compensation", False))


@dataclass(frozen=True)
class CompressionOptions:
    """The compression options of the family's configs (they inherit these fields).
    compressor: spec of the compressor of the messages (``topk:ratio=0.01``, ``sign``,
    ``qsgd:bits=4``, ``powersgd:rank=2``, ``ef(...)``, see ``relaxsgd list``);
    error_feedback: keep what was not sent and add it to the next message; aggregation:
    ``allreduce`` (exact mean of the messages) or ``ps`` (parameter server with two-way
    compression); server_compressor: the server's compressor in ps mode (empty: the workers'
    one); server_error_feedback: the server's own error feedback in ps mode."""

    compressor: str = "topk:ratio=0.01"
    error_feedback: bool = True
    aggregation: str = "allreduce"
    server_compressor: str = ""
    server_error_feedback: bool = True

    NEEDS = (Needs("server_compressor", lambda c: c.aggregation == "ps", "aggregation=ps"),
             Needs("server_error_feedback", lambda c: c.aggregation == "ps",
                   "aggregation=ps"))

    def check_compression(self, who: str) -> None:
        """ConfigError, naming algorithm ``who``, if the compression options are bad or
        one is given without what it needs (``NEEDS``)."""
        parse_compression(who, self.compressor, self.error_feedback, self.aggregation,
                          self.server_compressor)
        check_needs(self, f"{who} option ")


class CompressedAlgorithm(Algorithm):
    """An algorithm whose workers aggregate through one :class:`Aggregator`, ``self.agg``
    (built from the config's compression options), with its state in ``w.state["agg"]``."""

    def __init__(self, cfg: Any, info: Any) -> None:
        super().__init__(cfg, info)
        self.agg = make_aggregator(self.name, cfg, info.seed)

    membership = "quorum"  # see "Membership" in the module docstring

    def init_worker(self, w: Worker) -> None:
        w.state["agg"] = self.agg.init_state(w.params.numel(), w.layout, w.params.device)

    def adopt(self, w: Worker, donor: int) -> None:
        """A (re)joiner: the copied error-feedback residual is the donor's own error (the
        donor still sends it): zeroed; the FIFO chain starts afresh (the handle of a former
        incarnation's last aggregation never completes)."""
        self.agg.forget(w.rank)
        res = self.agg.residual(w.state["agg"])
        if res is not None:
            res.zero_()

    def server(self) -> ParameterServer | None:
        """The parameter server of ``aggregation: ps`` (None otherwise)."""
        return self.agg.ps


@dataclass(frozen=True)
class EFSGDConfig(CompressionOptions):
    """The compression options (:class:`CompressionOptions`); compressor: spec of the
    compressor of the gradients (default ``topk:ratio=0.01``)."""

    def __post_init__(self) -> None:
        self.check_compression("efsgd")


class EFSGD(CompressedAlgorithm):
    name = "efsgd"
    Config = EFSGDConfig
    metric_keys = ("payload_bytes", "ef_residual_norm_mean")
    resumable = True

    def program(self, w: Worker) -> Program:
        # blocking aggregations: at the loop top nothing is in flight, and all the state
        # (residual, PowerSGD's Q, random-k's step, the server's) is in w.state["agg"]
        while w.step < w.total_steps:
            yield Checkpoint()
            g = yield Grad()
            got = yield from self.agg.mean(w, w.state["agg"], g)
            w.apply_grad(got.mean)
