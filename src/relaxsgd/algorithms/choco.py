"""Choco-SGD: decentralized SGD with compressed gossip of differences to public copies.

A. Koloskova, S. U. Stich, M. Jaggi, "Decentralized Stochastic Optimization and Gossip
Algorithms with Compressed Communication", ICML 2019 (Algorithm 2, CHOCO-SGD).

Math: worker i holds its model ``x_i``, the public copy ``xhat_i`` of its own model, and
``s_i = sum_j W_ij xhat_j`` over itself and its neighbours (W the topology's doubly
stochastic mixing matrix; keeping the weighted sum instead of every neighbour's copy
needs 2d floats whatever the degree, as in the authors' code). Every step:

1. ``x_i <- x_i - eta d`` (the local optimizer's step on a stochastic gradient at x_i);
2. ``q_i = C(x_i - xhat_i)`` with the compressor C (``compressor``, any spec string of
   :func:`relaxsgd.compress.spec.make_compressor`; biased ones such as top-k or sign work,
   that is the point of the method); send q_i to every neighbour, receive theirs;
3. ``xhat_i += q_i``; ``s_i += W_ii q_i + sum_j W_ij q_j``;
4. ``x_i <- x_i + gamma (s_i - xhat_i)`` (= ``gamma sum_j W_ij (xhat_j - xhat_i)``, the
   consensus step with step size ``gamma``).

The public copies are the same on every worker that holds them (each applies the same
decoded q_j), so the mixing in step 4 keeps the sum of the models exactly up to float
rounding: the mean model moves only by the gradient steps. DECIDED (``public_init``):
``exchange`` (default) starts the public copies at the initial models, sent once in full
precision to the neighbours before the first step (so nothing assumes that the workers
start from identical models); ``zero`` is the paper's ``xhat = 0``, whose first messages
then compress the whole model.

Communication: every step each worker sends one compressed message (the compressor's
``nbytes``) to each neighbour. The graph must be static and undirected.

Membership (issue 20, :mod:`relaxsgd.membership`): ``fixed``, because each worker keeps a
public copy of every neighbour, updated only by that neighbour's compressed differences; a
departed neighbour's copy goes stale and a joiner has none, and the fixed mixing matrix
waits for every neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..compress.spec import make_compressor
from ..errors import ConfigError
from ..tune.params import Float
from .base import Algorithm, Checkpoint, Grad, Program, RunInfo, Worker
from .dpsgd import Mixer, gossip, mix


@dataclass(frozen=True)
class ChocoConfig:
    """compressor: spec string of the compressor C of the differences (e.g.
    "topk:ratio=0.1", "qsgd:bits=4", "sign"); gamma: the consensus step size in (0, 1];
    public_init: "exchange" (public copies = the initial models, sent once in full) or
    "zero" (the paper's)."""

    compressor: str = "topk:ratio=0.1"
    gamma: float = 0.4
    public_init: str = "exchange"

    def __post_init__(self) -> None:
        make_compressor(self.compressor)  # a bad spec is a one-line ConfigError
        if self.public_init not in ("exchange", "zero"):
            raise ConfigError(f"choco option public_init={self.public_init!r} is unknown; "
                              "choose one of: exchange, zero")
        if not (0 < self.gamma <= 1 and math.isfinite(self.gamma)):
            raise ConfigError(f"choco option gamma (consensus step size) must be in (0, 1], "
                              f"got {self.gamma}")


class ChocoSGD(Algorithm):
    name = "choco"
    Config = ChocoConfig
    search_space = {"gamma": Float(0.05, 1.0, log=True)}
    needs_topology = True
    metric_keys = ("interactions_per_worker",)
    resumable = True
    membership = "fixed"
    fixed_reason = ("each worker keeps a public copy of every neighbour, which a departed "
                    "one stops updating and a joiner lacks")

    def __init__(self, cfg: ChocoConfig, info: RunInfo) -> None:
        super().__init__(cfg, info)
        self.comp = make_compressor(cfg.compressor)
        self.mixer: Mixer | None = None
        topo = info.topology
        if topo is not None and (topo.directed or getattr(topo, "period", 1) != 1):
            raise ConfigError(f"choco needs a static undirected topology, not "
                              f"{topo.name!r}; use ring, torus, random-regular, ...")

    def init_worker(self, w: Worker) -> None:
        # public: whether the public copies are set (public_init "exchange" sets them in
        # the loop's first round: a program's prologue may not communicate)
        w.state.update(xhat=torch.zeros_like(w.params), s=torch.zeros_like(w.params),
                       cstate=self.comp.init_state(w.params.numel(), w.layout, w.params.device),
                       public=self.cfg.public_init == "zero")

    def program(self, w: Worker) -> Program:
        # Loop state: w.step (= the round k), w.rng and w.state (xhat, s, the compressor's
        # state, whether the public copies are set); every message of a round is received
        # in that round.
        if self.mixer is None:
            self.mixer = Mixer(self.info.topology, self.info.n)
        st, gamma = w.state, self.cfg.gamma
        outs, ins, self_w = self.mixer.peers(w.rank, 0)
        while w.step < w.total_steps:
            yield Checkpoint()
            if not st["public"]:
                yield from self._exchange_public(w)
            k = w.step
            g = yield Grad()
            w.apply_grad(g)
            payload, st["cstate"] = self.comp.compress(w.params - st["xhat"], st["cstate"],
                                                       w.rng)
            got = yield from gossip(w, payload, outs, [j for j, _ in ins], k,
                                    nbytes=self.comp.nbytes(payload))
            q = self.comp.decompress(payload)
            st["xhat"] += q
            acc = q.to(torch.float64) * self_w
            for j, wij in ins:
                acc += self.comp.decompress(got[j]).to(torch.float64) * wij
            st["s"] += acc.to(q.dtype)
            w.params.add_(st["s"] - st["xhat"], alpha=gamma)
            w.count("interactions_per_worker", len(ins) / self.info.n)

    def _exchange_public(self, w: Worker) -> Program:
        """public_init "exchange": the public copies are the initial models, sent in full."""
        assert self.mixer is not None
        outs, ins, self_w = self.mixer.peers(w.rank, 0)
        x0 = w.params.clone()
        got = yield from gossip(w, x0, outs, [j for j, _ in ins], "init")
        w.state["xhat"].copy_(x0)
        w.state["s"].copy_(mix(x0, self_w, ins, got))
        w.state["public"] = True
