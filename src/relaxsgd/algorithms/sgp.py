"""SGP: Stochastic Gradient Push, push-sum gossip over a time-varying directed graph.

M. Assran, N. Loizou, N. Ballas, M. Rabbat, "Stochastic Gradient Push for Distributed Deep
Learning", ICML 2019.

Math: worker i keeps a push-sum numerator ``x_i`` and weight ``w_i`` (initially the model
and 1); its de-biased model is ``z_i = x_i / w_i``: gradients are taken at ``z_i`` and the
worker's parameters (evaluated, averaged into the mean model) are ``z_i``. Step k:

1. ``g = g_i(z_i)``; ``x_i <- x_i - eta d`` where ``d`` is the local optimizer's direction
   for ``g`` (momentum, weight decay; with plain SGD ``d = g``, Assran et al.'s
   Algorithm 1: the step is applied to the numerator);
2. push: send ``(x_i / 2, w_i / 2)`` to the step's out-peer and keep ``(x_i / 2, w_i / 2)``;
3. receive: add the ``(x, w)`` messages of the step's in-peers, then ``z_i = x_i / w_i``.

``overlap = tau`` (Assran et al.'s tau-overlap SGP): the sends are non-blocking and step k
adds the messages sent at step ``k - tau`` (those have had tau steps of computation to
arrive), so communication hides behind computation; after its last step a worker adds the
tau messages still due to it, so no mass is lost. ``tau = 0`` is the synchronous form.
The sum over workers (and messages in flight) of ``x`` and of ``w`` is kept exactly by the
mixing, so the weighted mean of the de-biased models moves only by gradient steps.

Graph (``graph``): ``exponential`` (default, the paper's): the one-peer exponential graph
on the run's n, whatever ``--topology`` says: at step k, i sends to
``i + 2^(k mod ceil(log2 n))``; every node then receives exactly one message a step.
``topology``: the run's topology; at step k node i sends to its neighbour number
``k mod deg(i)`` (its in-peers at k are the neighbours that chose it), so in-degrees vary
and the push-sum weights do the de-biasing.

Communication: one message of 4d + 4 bytes (the numerator and the weight, float32) per
worker per step.

Membership (issue 20, :mod:`relaxsgd.membership`): ``fixed``, because push-sum over a fixed
(time-varying) graph: the weights sent to a departed worker are lost mass and every worker
waits (Recv) for its in-neighbours' messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checks import require_int
from ..errors import ConfigError
from ..topology import make_topology
from .base import Algorithm, Checkpoint, Grad, Program, Recv, RunInfo, Send, Worker, tensor_nbytes
from .swarm import undirected_neighbors

GRAPHS = ("exponential", "topology")


@dataclass(frozen=True)
class SGPConfig:
    """overlap: tau >= 0, steps a push may take to arrive (0: synchronous SGP);
    graph: "exponential" (the one-peer exponential graph, the paper's) or "topology" (the
    run's --topology, one neighbour per step in turn)."""

    overlap: int = 0
    graph: str = "exponential"

    def __post_init__(self) -> None:
        require_int(self.overlap, "sgp option overlap (steps of delay tau)", at_least=0)
        if self.graph not in GRAPHS:
            raise ConfigError(f"sgp option graph={self.graph!r} is unknown; choose one of: "
                              f"{', '.join(GRAPHS)}")


class SGP(Algorithm):
    name = "sgp"
    needs_topology = True  # used with graph="topology"; the exponential graph ignores it
    Config = SGPConfig
    metric_keys = ("interactions_per_worker", "push_weight_mean")
    resumable = True
    membership = "fixed"
    fixed_reason = ("push-sum over a fixed graph: weight sent to a departed worker is "
                    "lost mass, and every worker waits for its in-neighbours")

    def __init__(self, cfg: SGPConfig, info: RunInfo) -> None:
        super().__init__(cfg, info)
        self._expo = None
        self._nbrs: list[list[int]] | None = None

    def out_peer(self, i: int, k: int) -> int:
        if self.cfg.graph == "exponential":
            if self._expo is None:
                self._expo = make_topology("exponential", self.info.n)
            return self._expo.neighbors(i, k)[0]
        nb = self._neighbours()[i]
        return nb[k % len(nb)]

    def in_peers(self, i: int, k: int) -> list[int]:
        if self.cfg.graph == "exponential":
            if self._expo is None:
                self._expo = make_topology("exponential", self.info.n)
            return self._expo.in_neighbors(i, k)
        return [j for j in self._neighbours()[i] if self.out_peer(j, k) == i]

    def _neighbours(self) -> list[list[int]]:
        if self._nbrs is None:
            self._nbrs = undirected_neighbors(self.info.topology, self.info.n)
        return self._nbrs

    def init_worker(self, w: Worker) -> None:
        w.state["weight"] = 1.0

    def program(self, w: Worker) -> Program:
        n, tau = self.info.n, self.cfg.overlap
        total = w.total_steps
        # Loop state: w.step (= k, one local step a round) and w.state["weight"]; with
        # tau > 0 the pushes of the last tau rounds wait in the inbox, which the runtime
        # saves with the checkpoint (position w.step is a consistent cut: a worker at round
        # k needs the pushes of round k - tau, which its in-peers sent before their own
        # round k).
        while w.step < total:
            yield Checkpoint()
            k = w.step
            g = yield Grad()
            if n == 1:
                w.apply_grad(g)
                continue
            wt = w.state["weight"]
            w.params.mul_(wt)  # the numerator x_i
            w.apply_grad(g)
            x = w.params * 0.5
            w.params.div_(wt)  # while waiting, the worker's model is z after its step
            msg = (x, wt * 0.5)
            yield Send(self.out_peer(w.rank, k), msg, tensor_nbytes(x) + 4, tag=k)
            w.state["weight"] = wt * 0.5  # numerator x / 2, weight / 2: z is unchanged
            w.count("interactions_per_worker", 1.0 / n)
            if k >= tau:
                yield from self._receive(w, k - tau)
        for k in range(max(total - tau, 0), total):  # the pushes still due
            if n > 1:
                yield from self._receive(w, k)

    def _receive(self, w: Worker, k: int) -> Program:
        """Add the pushes of step ``k`` to the numerator and weight; set z = x / w.

        Between steps the numerator is ``params * weight`` (params hold z)."""
        wt = w.state["weight"]
        x = w.params * wt
        for j in self.in_peers(w.rank, k):
            xj, wj = yield Recv(j, tag=k)
            x = x + xj
            wt += wj
        w.state["weight"] = wt
        w.params.copy_(x / wt)
        w.observe("push_weight", wt)
