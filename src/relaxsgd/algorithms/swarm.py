"""SwarmSGD: asynchronous decentralized SGD with local steps, pairwise averaging, quantization.

G. Nadiradze, A. Sabour, P. Davies, S. Li, D. Alistarh, "Asynchronous Decentralized SGD
with Quantized and Local Updates", NeurIPS 2021 (arXiv 1910.12308).

Math. Workers sit on a graph G (``--topology``; any degrees; a time-varying graph is used
as the union of its edges over one period). There are no rounds: a worker runs ``H_i``
local SGD steps (``H`` fixed, or geometric with mean ``H``), then averages its model with
ONE neighbour j. Blocking averaging: ``x_i = x_j = (x_i + x_j) / 2`` with both models
after their local steps. Non-blocking averaging (the paper's Algorithm 1): each worker
keeps ``xhat_i``, its model at its last interaction (its published copy), and its local
progress since then, ``S_i = xhat_i - x_i``; an interaction sets
``x_i <- (Q(xhat_i) + Q(xhat_j)) / 2 - S_i`` (and symmetrically for j), so a worker averages
with what its partner last published and keeps its own progress. Written as an update,
``x_i += delta_i``; with ``exact_mean`` (default) ``delta_i = (Q(c_j) - Q(c_i)) / 2``,
which keeps ``x_i + x_j`` exactly even when quantized (``c`` is the copy each side sends:
``xhat`` non-blocking, ``x`` blocking); without it, ``delta_i = (Q(c_i) + Q(c_j)) / 2 - c_i``
(the formula above; the sum is kept in expectation only). Unquantized, both are the same.

Communication schedule (``schedule``):

- ``async`` (default, the practice): each worker loops ``Compute(H_i)``, picks a neighbour
  uniformly at random from its own stream, and sends it an :class:`Exchange`. The partner
  answers in its handler: non-blocking at once from its published copy, even while it
  computes, and its own ``x += delta`` waits in ``w.state`` for its next step boundary
  (:func:`add_later`; additive updates commute, so this equals applying it at arrival);
  blocking through :class:`Deferred` at its next step boundary, with its current model.
  No global clock; a partner may be in several interactions at once (updates are
  additive, so the sum is still kept). Lockstep: with fixed H and equal step times (the
  simulator's default compute model) every worker initiates at the same instants, so
  every interaction overlaps others at both ends, and additive updates computed from the
  same stale copies mix poorly (a worker's own weight drops to 0 or below). Measured in
  pure gossip, 16 workers on a random 4-regular graph, H = 3, 60 steps: the consensus
  distance falls to 2e-5 of its start with fixed H, to 5e-7 with geometric H, to 3e-7
  with fixed H and log-normal worker speeds (sigma 0.2), against 4e-6 for the sequential
  schedule. Hence ``steps_dist = "geometric"`` (the paper's analysed choice) by default.
- ``sequential`` (the analysed model, the reference): a shared stream of edges, drawn
  uniformly from G with the run's seed (every worker regenerates the same stream, so it
  also works in the distributed runtime). Interaction t on edge (i, j): both run their
  local steps for it, send each other their copies (Send/Recv tagged t), and average.
  Each worker follows the stream's edges that touch it, in order; interactions on
  disjoint edges run concurrently, which is a valid serialization of the stream, so the
  result is exactly the sequential model's. The stream is cut at the first T where every
  worker has done its ``total_steps``; interactions of a worker whose budget is spent come
  with 0 local steps (pure averaging).

``update``: ``symmetric`` (both update; default) or ``pull`` (one-sided: only the
initiator averages, x_i += (Q(c_j) - c_i) / 2; what the authors' MPI one-sided code did).
``overlap`` (async, non-blocking): the initiator does not wait for the reply; it starts its
next local steps and applies the average at their end.

Quantization (``quantizer``): ``lattice`` (Davies et al., ICLR 2021; module
:mod:`relaxsgd.quantize.lattice`): ``bits`` per coordinate, stochastic (unbiased)
rounding, decoded against the receiver's own copy. DECIDED: ``eps`` from the observed
spread of the models: the sender takes ``D = spread + drift`` (``spread``: the largest
coordinate gap between its copy and a partner's seen when decoding, as a maximum that decays
by ``spread_decay`` a message, since one partner's gap is a noisy guess of the next's:
measured on the MNIST-1D MLP with 64 workers, 2.7% of interactions failed with the last
gap alone, 0.4-0.8% with a decay of 0.8-0.95, for 6-22% larger eps; ``drift``: how far
its copy moved since its last message) and ``eps = safety * D / (2^(bits-1) - 1)``, per
parameter tensor (``per_tensor``; layers disagree by amounts 6x apart on the MNIST-1D MLP,
and one eps for all would be set by the worst); a fixed ``eps`` (the authors: 0.0035 / n)
is an option. With the adaptive eps, a worker's first message (before it has seen any
spread) is full precision. Decode failures are detected by the payload's checksum and
counted (``decode_failures``); the failed message is replaced by a full-precision one:
when the partner cannot decode the request it answers "resend" and the initiator sends its
copy again in full precision; when the initiator cannot decode the reply it fetches, in
full precision, the exact value its partner used (kept until a tiny ``commit`` or the
fetch arrives). Those bytes are counted by the network and in ``fallback_bytes``.
``qsgd``: plain b-bit stochastic quantization of the difference to a per-pair reference
(:mod:`relaxsgd.quantize.qsgd_diff`): the last value the receiver decoded from this sender,
which both hold (the first message of each direction of a pair is full precision and sets
it; each side keeps one reference per neighbour and direction, so 2 deg(i) d floats).
Both sides number the messages of a direction, so one that overtook another is detected
(counted as a decode failure) and resynchronised by the same full-precision fallback.

Metrics (``metric_keys``): ``interactions_per_worker`` (each side of an interaction counts
1/n), ``decode_failures``, ``fallback_bytes``, ``staleness_mean`` (local steps the partner
had done since it published the copy that was used; in the simulator a partner in the
middle of ``Compute(H)`` counts its whole block as done, so this is exact at step
boundaries and an upper bound inside a block), ``lattice_eps_mean``.

Checkpoints (the rule of :mod:`.base`): everything a program goes on from is in ``w.state``:
the published copy ``xhat`` and ``pub_step``, the handlers' deltas not yet absorbed
(``acc``), the values kept for a fetch (``pending``), the message number ``seq``, the
handlers' generator ``hrng``, the codec's state (lattice ``spread`` and ``last_sent``; qsgd
references and numbers), with ``overlap`` the exchange in flight (``inflight``: the runtime
waits for its reply before saving), and in the sequential schedule ``ti``, the index of the
worker's next interaction in its plan. The async safe point is the loop's top at ``w.step``
(nobody ever waits for a stopped worker: its handlers answer). The sequential safe point is
before each interaction t, at :func:`.swarm_state.stream_positions` ``[t]``: the mean over
workers of the local steps the stream gives them before t. It depends on t alone and never
decreases, so the cut is consistent (an interaction is done on both sides or on neither),
and it is in local steps per worker, so ``checkpoint_every`` means what it does elsewhere
(a worker's safe points are its own interactions, on average about H such steps apart;
measured at H = 4, n = 16 and 64: 99% of gaps under 18, the largest 26-36, so a checkpoint
asked at a moment, as by Ctrl-C, can come that much later than in the async schedule).

Code layout: the options in :mod:`.swarm_config`, the message codec in :mod:`.swarm_codec`,
the graph, the sequential plans and the handler-to-program state in :mod:`.swarm_state`.

Membership (issue 20): ``gossip``. The async schedule draws each partner among its live
neighbours (``Members()``); an exchange with one that left meanwhile raises
``PeerUnavailable`` and is skipped. A (re)joiner copies its lowest-id live neighbour's state
at that one's safe point; the graph spans ``elastic.max_workers`` ids. The sequential
schedule plays a step-keyed trace known in advance (edges drawn among the workers live at
each t: :mod:`.swarm_sequential`) and is ``fixed`` for any other churn.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import salts
from ..devices import draw
from ..training import seeded_generator
from ..tune.params import Choice, Int
from .base import (
    Algorithm,
    Checkpoint,
    Compute,
    Deferred,
    Exchange,
    Handle,
    Members,
    PeerUnavailable,
    Program,
    Reply,
    RunInfo,
    Wait,
    Worker,
)
from .swarm_batch import answer_many
from .swarm_codec import Codec
from .swarm_codec import effective_safety as effective_safety  # re-exported
from .swarm_config import SMALL, SwarmConfig
from .swarm_prefetch import prefetch_requests
from .swarm_sequential import adopt_sequential, pair, trace_problem, traced_plans
from .swarm_state import absorb as absorb  # re-exported (AD-PSGD, tests)
from .swarm_state import add_later as add_later
from .swarm_state import finish as finish
from .swarm_state import sequential_plans, stream_positions
from .swarm_state import undirected_neighbors as undirected_neighbors


class SwarmSGD(Algorithm):
    name = "swarm"
    Config = SwarmConfig
    search_space = {"H": Int(1, 32, log=True), "bits": Int(4, 16),
                    "overlap": Choice((False, True))}
    needs_topology = True
    metric_keys = ("interactions_per_worker", "decode_failures", "fallback_bytes",
                   "staleness_mean", "lattice_eps_mean")
    resumable = True
    membership = "gossip"

    def __init__(self, cfg: SwarmConfig, info: RunInfo) -> None:
        super().__init__(cfg, info)
        why = trace_problem(info.extra) if cfg.schedule == "sequential" else None
        if why is not None:  # see "Membership" in the module docstring
            self.membership, self.fixed_reason = "fixed", why
        # the async schedule never waits for a partner's progress: the distributed runtime
        # checkpoints its workers one by one; the sequential stream needs a common cut
        self.asynchronous = cfg.schedule == "async"
        self.codec = Codec(cfg)
        self._nbrs: list[list[int]] | None = None
        self._plans: list[list[tuple[int, int, int, bool]]] | None = None
        self._where: list[float] | None = None

    # -- graph and schedule --------------------------------------------------------
    def neighbors(self, i: int) -> list[int]:
        """Neighbours of ``i``: the union of the topology's edges over one period."""
        if self._nbrs is None:
            self._nbrs = undirected_neighbors(self.info.topology,
                                              self.info.extra.get("max_workers", self.info.n))
        return self._nbrs[i]

    def plan(self, rank: int, total: int) -> list[tuple[int, int, int, bool]]:
        """The sequential schedule of ``rank``: (t, partner, local steps, initiator)."""
        if self._plans is None:
            self._plans = self._make_plans(total)
        return self._plans[rank]

    def positions(self, total: int) -> list[float]:
        """The checkpoint position of each interaction t of the sequential stream (see
        :func:`.swarm_state.stream_positions`); derived from the seed, like the plans."""
        if self._where is None:
            self._where = stream_positions([self.plan(r, total) for r in range(self.info.n)])
        return self._where

    def _make_plans(self, total: int) -> list[list[tuple[int, int, int, bool]]]:
        n = self.info.n
        edges = sorted({(min(i, j), max(i, j)) for i in range(n) for j in self.neighbors(i)})
        if self.membership == "gossip":  # a step-keyed trace known in advance
            return traced_plans(edges, n, total, self.info.seed, self.cfg.H,
                                self.cfg.steps_dist == "geometric", self.info.extra["trace"],
                                self.neighbors)
        return sequential_plans(edges, n, total, self.info.seed, self.cfg.H,
                                self.cfg.steps_dist == "geometric")

    def _draw_h(self, w: Worker, remaining: int) -> int:
        h = self.cfg.H
        if self.cfg.steps_dist == "geometric" and h > 1:
            u = float(draw(torch.rand, (), generator=w.rng, dtype=torch.float64,
                           device=w.rng.device))
            h = 1 + int(math.floor(math.log(max(u, 1e-300)) / math.log(1.0 - 1.0 / h)))
        return min(h, remaining)

    # -- per-worker state ----------------------------------------------------------
    def adopt(self, w: Worker, donor: int) -> None:
        if self.cfg.schedule == "sequential":  # its place in its own plan, not the donor's
            adopt_sequential(lambda r: self.plan(r, w.total_steps), w, donor)

    def init_worker(self, w: Worker) -> None:
        w.state.update(pending={}, pub_step=0, seq=0,
                       hrng=seeded_generator(self.info.seed, w.rank, salts.SWARM_HANDLER))
        if self.cfg.schedule == "sequential":
            w.state["ti"] = 0  # index of the next interaction of its plan
        else:
            w.state["inflight"] = None  # overlap: the exchange in flight (see _async)
        if self.cfg.averaging == "nonblocking":
            w.state["xhat"] = w.params.clone()
        self.codec.init(w)

    def _copy(self, w: Worker) -> Tensor:
        """What this worker sends: its published copy (non-blocking) or its model."""
        if self.cfg.averaging == "nonblocking":
            return w.state["xhat"].clone()
        return w.params.clone()

    def _stale(self, w: Worker) -> int:
        return w.step - w.state["pub_step"] if self.cfg.averaging == "nonblocking" else 0

    def _publish(self, w: Worker) -> None:
        if self.cfg.averaging == "nonblocking":
            w.state["xhat"].copy_(w.params)
        w.state["pub_step"] = w.step

    def _delta(self, q_own: Tensor, q_other: Tensor, c: Tensor) -> Tensor:
        if self.cfg.exact_mean:
            return (q_other - q_own) / 2
        return (q_own + q_other) / 2 - c

    def _interacted(self, w: Worker, stale: int | None) -> None:
        """Count one side of an interaction; ``stale``: of the partner copy used, if any."""
        w.count("interactions_per_worker", 1.0 / self.info.n)
        if stale is not None:
            w.observe("staleness", stale)

    # -- programs ------------------------------------------------------------------
    def program(self, w: Worker) -> Program:
        if self.cfg.schedule == "sequential":
            yield from self._sequential(w)
        else:
            yield from self._async(w)
        finish(w)

    def _async(self, w: Worker) -> Program:
        # Loop state: w.step, w.rng and, with overlap, the exchange in flight in
        # w.state["inflight"] (peer, own copy, own decoded value, handle): at a checkpoint
        # the runtime waits for that handle and saves its reply with the rest.
        nbrs, st = self.neighbors(w.rank), w.state
        while w.step < w.total_steps:
            yield Checkpoint()
            yield Compute(self._draw_h(w, w.total_steps - w.step))
            if st["inflight"] is not None:
                try:
                    yield from self._finish(w, *st["inflight"])
                except PeerUnavailable:
                    pass  # a lost partner (dist runtime only): skip it; the runtime counted it
                st["inflight"] = None
            live = set((yield Members()))  # partners among the live neighbours (issue 20)
            near = [j for j in nbrs if j in live]
            if not near:
                continue
            peer = near[int(draw(torch.randint, len(near), (), generator=w.rng,
                                        device=w.rng.device))]
            c, q_own, msg, nb = self._request(w, peer)
            try:
                if self.cfg.overlap and w.step < w.total_steps:
                    handle = yield Exchange(peer, msg, nb, blocking=False)
                    st["inflight"] = (peer, c, q_own, handle)
                else:
                    reply = yield Exchange(peer, msg, nb)
                    yield from self._finish(w, peer, c, q_own, reply)
            except PeerUnavailable:
                continue  # the others go on among themselves (issue 5)

    def _request(self, w: Worker, peer: int) -> tuple[Tensor, Tensor, dict, int]:
        c = self._copy(w)
        if self.cfg.update == "pull":
            msg, q_own, nb = {"op": "pull"}, c, SMALL
        else:
            msg, q_own, nb = self.codec.encode(w, peer, c, w.rng)
            msg["op"] = "avg"
        w.state["seq"] += 1
        msg.update(stale=self._stale(w), seq=w.state["seq"])
        return c, q_own, msg, nb

    def _finish(self, w: Worker, peer: int, c: Tensor, q_own: Tensor, reply: Any) -> Program:
        """Initiator side: decode the reply (with the fallbacks), apply, publish."""
        if isinstance(reply, Handle):  # an overlapped exchange
            reply = yield Wait(reply)
        absorb(w)
        seq = w.state["seq"]
        if reply["status"] == "resend":  # the partner could not decode: redo in full
            msg, q_own, nb = self.codec.full(w, peer, c)
            msg.update(op="avg", stale=self._stale(w), seq=seq)
            w.count("fallback_bytes", nb)
            reply = yield Exchange(peer, msg, nb)
        q_other, ok = self.codec.decode(w, peer, reply, c)
        if not ok:
            w.count("decode_failures")
            w.count("fallback_bytes", SMALL)
            full = yield Exchange(peer, {"op": "fetch", "seq": seq}, SMALL)
            q_other, _ = self.codec.decode(w, peer, full, c)
        elif reply.get("pending"):
            yield Exchange(peer, {"op": "commit", "seq": seq}, SMALL, blocking=False)
        absorb(w)
        w.params.add_(self._delta(q_own, q_other, c))
        self._interacted(w, reply["stale"])
        self._publish(w)

    def on_exchange(self, w: Worker, src: int, payload: Any) -> Reply | Deferred:
        op = payload["op"]
        if op in ("commit", "fetch"):
            seq, value = w.state["pending"].get(src, (None, None))
            if seq == payload["seq"]:  # (a late commit must not drop a newer value)
                del w.state["pending"][src]
            if op == "commit":
                return Reply(None, 0)
            # fetch: the exact value this worker used, in full precision
            msg, _, nb = self.codec.full(w, src, value)
            w.count("fallback_bytes", nb)
            return Reply(msg, nb)
        if self.cfg.averaging == "blocking":
            return Deferred(lambda wk: self._answer(wk, src, payload))
        return self._answer(w, src, payload)

    def on_exchange_batch(self, ws: list[Worker], srcs: list[int],
                          payloads: list[Any]) -> list[Reply | Deferred]:
        return answer_many(self, ws, srcs, payloads)  # lattice requests coded together

    def on_resume_batch(self, ws: list[Worker], members: Any) -> int:
        """Simulator hook: ``ws`` resume together from their local steps; their lattice
        requests are coded ahead as one batch (:mod:`.swarm_prefetch`, exact)."""
        return prefetch_requests(self, ws, members)

    def _answer(self, w: Worker, src: int, req: dict) -> Reply:
        """Partner side of an interaction (at once, or at the step boundary if blocking)."""
        c = self._copy(w)
        stale = self._stale(w)
        if req["op"] == "pull":
            msg, q_own, nb = self.codec.encode(w, src, c, w.state["hrng"])
            self._keep(w, src, req["seq"], msg, q_own)
            self._interacted(w, None)
            return Reply({**msg, "status": "ok", "stale": stale}, nb)
        q_other, ok = self.codec.decode(w, src, req, c)
        if not ok:
            w.count("decode_failures")
            return Reply({"status": "resend"}, 4)
        msg, q_own, nb = self.codec.encode(w, src, c, w.state["hrng"])
        self._keep(w, src, req["seq"], msg, q_own)
        delta = self._delta(q_own, q_other, c)
        if self.cfg.averaging == "nonblocking":
            add_later(w, delta)
            w.state["xhat"].add_(delta)  # the published copy moves; unpublished progress stays
        else:  # at the step boundary (Deferred): the model may be written
            w.params.add_(delta)
            self._publish(w)
        self._interacted(w, req["stale"])
        return Reply({**msg, "status": "ok", "stale": stale}, nb)

    def _keep(self, w: Worker, src: int, seq: int, msg: dict, q_own: Tensor) -> None:
        """Keep a quantized reply's exact value until the initiator commits or fetches it."""
        if msg["kind"] == "q":
            w.state["pending"][src] = (seq, q_own)
            msg["pending"] = True

    # -- the sequential (analysed) schedule ----------------------------------------
    def _sequential(self, w: Worker) -> Program:
        # Loop state: w.state["ti"], the index in this worker's plan of its next
        # interaction; the safe point before interaction t sits at stream_position(t).
        plan = self.plan(w.rank, w.total_steps)
        where = self.positions(w.total_steps)
        st = w.state
        while st["ti"] < len(plan):
            t, j, h, init = plan[st["ti"]]
            yield Checkpoint(position=where[t])
            if h:
                yield Compute(h)
            yield from pair(self, w, j, t, init)
            st["ti"] += 1
        while w.step < w.total_steps:  # a graph without edges (n = 1)
            yield Checkpoint()
            yield Compute(w.total_steps - w.step)
