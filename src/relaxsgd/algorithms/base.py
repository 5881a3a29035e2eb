"""The effect model: what an algorithm's worker program may ask of its runtime.

An algorithm is written once, as the program of ONE worker: a generator that yields
effects and receives their results, plus handlers for messages that arrive while the
worker is busy. The simulator (:mod:`relaxsgd.sim`) fulfils effects on a virtual clock;
the distributed runtime (:mod:`relaxsgd.distributed`) fulfils them with torch.distributed.
An algorithm never imports torch.distributed and never knows which runtime runs it.

Effects (``result = yield Effect(...)``):

- :class:`Compute` ``(steps)``: that many local optimizer steps on the worker's own data.
  Takes ``steps`` step-times of virtual time. Handlers' :class:`Deferred` actions that
  arrive meanwhile run at its end (the "next step boundary").
- :class:`Grad` ``()``: a stochastic gradient (flat tensor, a fresh copy) at the current
  parameters on the next batch; does not change the parameters; one step-time.
  Apply it with :meth:`Worker.apply_grad`.
- :class:`AllReduce` ``(tensors, nbytes)``: the mean over all workers, of a tensor or a
  list of tensors (same shapes on every worker). ``nbytes`` is the size of what each
  worker contributes as it would travel (default: the tensors' own size). Costed as the
  backend's all-reduce (:mod:`relaxsgd.sim.collectives`).
- :class:`AllGather` ``(payload, nbytes)``: the list of every worker's payload, by rank.
  Payloads (here and in Send/Exchange) are what the distributed runtime's wire format
  encodes (:mod:`relaxsgd.distributed.wire`: None, numbers, str, bytes, lists, tuples, dicts,
  tensors and registered payload dataclasses; never pickle).
- :class:`ServerRound` ``(payload, nbytes, down_nbytes)``: upload a message to the run's
  parameter server (:meth:`Algorithm.server`, :mod:`relaxsgd.algorithms.server`); the
  result is the server's reply of that round, once every worker's upload of the round has
  arrived (the k-th ServerRound of every worker is round k). One hop each way: the
  simulator charges a latency up, the uploads serialised through the server's link, the
  server's compute, the n replies serialised out of its link and a latency down; the
  distributed runtime runs the server on a thread of rank 0.
- :class:`Send` ``(peer, payload, nbytes, tag)``: one-way message into the peer's inbox;
  resolves when it has left the sender's link. :class:`Recv` ``(src, tag)`` waits for it.
- :class:`Exchange` ``(peer, payload, nbytes)``: request/response; the peer's
  ``Algorithm.on_exchange`` runs on the peer when the request arrives (even if the peer is
  busy computing) and returns a :class:`Reply` (or :class:`Deferred` to answer at its next
  step boundary); the result is the reply's payload.
- :class:`Spawn` ``(generator)``: run a sub-program (communication effects only) beside the
  main one; returns a :class:`Handle` at once; ``yield Wait(handle)`` gives its return value.
- :class:`Wait` ``(handle or list of handles)``: the result(s); time spent here is stall.
- :class:`Sleep` ``(seconds)``, :class:`Now` ``()``.
- :class:`Members` ``()``: the sorted tuple of live worker ids as this worker knows them
  now (costs nothing, like ``Now``); without churn always ``(0, ..., n-1)``. Gossip
  algorithms draw their partners from it (see "Membership" below).
- :class:`Checkpoint` ``(position)``: a safe point (see "Checkpoints" below).

Every communication effect takes ``blocking``; ``blocking=False`` returns a
:class:`Handle` at once (non-blocking communication that overlaps computation).

Results of collectives are fresh tensors owned by the receiving worker.

Checkpoints (the rule every algorithm follows). A worker program is a generator, and a
generator's locals cannot be saved; so everything a program needs to go on lives in
``w.state`` (plain data: tensors, numbers, lists, dicts, ``torch.Generator``; named tuples
and dataclasses registered with :func:`relaxsgd.state_tree.register_state_type`), in the
worker's parameters and optimizer state, or is derived from the config and the seed. A
program yields ``Checkpoint()`` at the top of its main loop, where that holds; nowhere
else. When no checkpoint is due the effect returns at once and costs nothing. When one is
due (the run's ``checkpoint_every`` has been reached at ``position``, or the run was asked
to stop), the runtime first waits for every handle still in flight in ``w.state`` (their
results are kept in the finished handles; the time is stall), then holds the worker until
every worker has reached its own safe point and nothing is in flight, saves, and lets the
program go on. ``relaxsgd resume`` rebuilds the run from the file and calls ``program(w)``
again on each unfinished worker; so a program's prologue (the code before its loop) must be
idempotent and issue no communication, and the loop must re-read everything from
``w.state``, so that the restarted program does exactly what the running one did after its
``yield Checkpoint()``. ``position`` (default: ``w.step``) must place the safe points in a
consistent cut: if every worker stops at its first safe point at or past a position,
every message a stopped worker waits for has been sent (local steps do it for round-based
and asynchronous algorithms; a schedule of numbered interactions uses its numbering).
In the simulator the resumed run equals, bit for bit, the run that was never interrupted
with the same checkpoint schedule (a conformance test checks every algorithm).

Membership (issue 20; :mod:`relaxsgd.membership`, docs/distributed.md "Membership").
Workers may leave (killed, frozen past the peer timeout), rejoin (a restarted worker keeps
its id) and join (a new id, up to ``elastic.max_workers``). ``Algorithm.membership`` says
how an algorithm copes: ``"gossip"`` (partners among ``Members()``; no rounds),
``"quorum"`` (every AllReduce/AllGather/ServerRound is taken among its participants: the
workers present when it started that have not left when it completes, the mean weighted
1/len(participants); AllGather's list has ``None`` for non-participants, by worker id), or
``"fixed"`` (a leave ends the run with one line). A (re)joining worker receives its
donor's state at the donor's next ``Checkpoint()`` (parameters, optimizer state,
``w.step``, ``w.state`` and the runtime's counters), then :meth:`Algorithm.adopt` fixes
what must not be copied, and ``program(w)`` starts as on resume. Every live worker hears
of a departure through :meth:`Algorithm.on_leave`.

Faults (the distributed runtime, and the simulator under churn): when the peer of an
:class:`Exchange` or :class:`Recv` is gone (its process died) or does not answer within the
runtime's peer timeout, :class:`PeerUnavailable` is raised inside the program at that
``yield`` (or at the ``Wait`` of its handle). An asynchronous algorithm that can go on
without that partner catches it and skips the interaction (the runtime has already counted
it as ``peer_unavailable``); uncaught, it ends the worker with a line naming the peer.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

Program = Generator["Effect", Any, Any]


class Effect:
    """Base class of everything a worker program may yield."""

    blocking: bool = True


@dataclass
class Compute(Effect):
    steps: int = 1
    blocking: bool = True


@dataclass
class Grad(Effect):
    blocking: bool = True


@dataclass
class AllReduce(Effect):
    tensors: Tensor | list[Tensor]
    nbytes: int | None = None
    blocking: bool = True


@dataclass
class AllGather(Effect):
    payload: Any
    nbytes: int
    pattern: str = "ring"  # the only one: a ring (a server is ServerRound's)
    blocking: bool = True


@dataclass
class ServerRound(Effect):
    payload: Any
    nbytes: int
    down_nbytes: int  # the size of the server's reply to each worker, as it travels
    blocking: bool = True
    # the worker's round number, counted in program order (several rounds may be in
    # flight, issued from spawns that a runtime may start in any order); None: the
    # runtime counts the ServerRounds as they reach it
    round: int | None = None


@dataclass
class Send(Effect):
    peer: int
    payload: Any
    nbytes: int
    tag: Any = 0
    blocking: bool = False


@dataclass
class Recv(Effect):
    src: int
    tag: Any = 0
    blocking: bool = True


@dataclass
class Exchange(Effect):
    peer: int
    payload: Any
    nbytes: int
    blocking: bool = True


@dataclass
class Spawn(Effect):
    program: Program
    blocking: bool = False


@dataclass
class Wait(Effect):
    handles: Any  # a Handle or a list of Handles


@dataclass
class Sleep(Effect):
    seconds: float


@dataclass
class Now(Effect):
    pass


@dataclass
class Members(Effect):
    """The sorted tuple of live worker ids as this worker knows them now (no cost)."""


@dataclass
class Checkpoint(Effect):
    """A safe point of the main program (see "Checkpoints" in the module docstring).

    ``position``: where the worker is, in the unit of the run's ``checkpoint_every`` (local
    steps; None means ``w.step``)."""

    position: float | None = None


@dataclass
class Reply:
    """What ``on_exchange`` answers: the payload and its size on the wire."""

    payload: Any
    nbytes: int


@dataclass
class Deferred:
    """Answer at the worker's next step boundary: ``fn(worker) -> Reply`` runs then."""

    fn: Callable[[Worker], Reply]


class Handle:
    """A pending result of a non-blocking effect; ``yield Wait(handle)`` gets it."""

    __slots__ = ("done", "value", "waiters", "label")

    def __init__(self, label: str = "") -> None:
        self.done = False
        self.value: Any = None
        self.waiters: list[Any] = []
        self.label = label

    def __repr__(self) -> str:
        return f"Handle({self.label}, done={self.done})"


class PeerUnavailable(RuntimeError):
    """The peer of an Exchange/Recv is gone or did not answer in time (see the module doc)."""

    def __init__(self, peer: int, reason: str) -> None:
        super().__init__(f"worker {peer} is unavailable: {reason}")
        self.peer = peer
        self.reason = reason


def tensor_nbytes(t: Tensor | list[Tensor]) -> int:
    """Bytes of a tensor (or list) as it would travel: its elements, nothing else."""
    if isinstance(t, (list, tuple)):
        return sum(tensor_nbytes(x) for x in t)
    return t.numel() * t.element_size()


class Worker(Protocol):
    """What a worker program sees of its worker. Both runtimes implement it.

    ``params`` is a flat float tensor VIEW of the worker's parameters: write into it with
    ``copy_``/``add_``; never rebind it. ``layout`` gives the (name, shape) of each
    parameter in flat order (PowerSGD reshapes by it).
    """

    rank: int
    n: int
    params: Tensor
    momentum: Tensor  # the local optimizer's momentum buffer (a view, like params)
    layout: list[tuple[str, torch.Size]]
    state: dict[str, Any]  # the algorithm's per-worker state (checkpointed with the rest)
    rng: torch.Generator  # the algorithm's per-worker random stream (seeded from seed, rank)
    step: int  # local optimizer steps done
    total_steps: int  # local optimizer steps this worker must do
    # the runtime forms server rounds one after another (quorum rounds under churn, in an
    # elastic job): a worker starts round k+1 only after round k's reply
    ordered_server_rounds: bool

    def apply_grad(self, grad: Tensor) -> None:
        """One optimizer step (momentum, weight decay, lr schedule) with this gradient."""

    def lr(self) -> float:
        """The learning rate of the next local step."""

    def count(self, key: str, value: float = 1.0) -> None:
        """Add to a per-worker counter (decode failures, interactions, ...)."""

    def observe(self, key: str, value: float) -> None:
        """Record one observation of a per-worker quantity (staleness, residual norm)."""


@dataclass
class RunInfo:
    """What an algorithm instance knows of the run, the same in both runtimes."""

    n: int
    seed: int
    topology: Any = None  # a relaxsgd.topology Topology, or None
    dim: int = 0  # number of parameters
    extra: dict[str, Any] = field(default_factory=dict)


class Algorithm:
    """Base class of an algorithm plug-in.

    Subclasses set ``name``, ``Config`` (a frozen dataclass of options, each with a
    default and documented in the class docstring), and implement :meth:`program`.
    One instance serves all the workers of a simulated run (per-worker state lives in
    ``worker.state``), and one worker in the distributed runtime.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = type(None)
    needs_topology: ClassVar[bool] = False
    # counters (summed over workers) and observations (``<key>_mean``) that become
    # metrics.csv columns; anything else counted still reaches result.json
    metric_keys: ClassVar[tuple[str, ...]] = ()
    # True once the program follows the checkpoint rule (module docstring, "Checkpoints")
    resumable: ClassVar[bool] = False
    # True when the workers never wait for each other (SwarmSGD, AD-PSGD): the distributed
    # runtime then saves each worker on its own, without a barrier (relaxsgd.distributed.saving)
    asynchronous: ClassVar[bool] = False
    # The options ``relaxsgd tune`` searches, by Config field name, with their ranges and
    # scales (relaxsgd.tune.params: Float, Int, Choice; log for rates and periods). The
    # training options (lr, momentum, ...) come from the task's recipe, not from here.
    search_space: ClassVar[dict[str, Any]] = {}
    # What the algorithm does when the worker set changes (module docstring,
    # "Membership"): "gossip", "quorum" or "fixed"; the class docstring says why.
    membership: ClassVar[str] = "fixed"

    def __init__(self, cfg: Any, info: RunInfo) -> None:
        self.cfg = cfg
        self.info = info

    def init_worker(self, w: Worker) -> None:
        """Set up ``w.state``; all workers start from identical parameters already."""

    def program(self, w: Worker) -> Program:
        """The worker's main program: must do exactly ``w.total_steps`` local steps."""
        raise NotImplementedError

    def server(self) -> Any:
        """The run's parameter server (a :class:`relaxsgd.algorithms.server.ParameterServer`
        or an object with its ``init_state(numel, layout)`` and ``serve(state, payloads)``),
        or None when the workers never yield :class:`ServerRound`. Called once per run by
        the runtime that hosts the server."""
        return None

    def on_leave(self, w: Worker, gone: int) -> None:
        """Called on every live worker ``w`` when it learns that ``gone`` left (at once for
        a closed connection, after the peer timeout for a frozen one). Default: nothing."""

    def adopt(self, w: Worker, donor: int) -> None:
        """Called on a (re)joining worker ``w`` after the runtime copied into it the donor's
        parameters, buffers, optimizer state, ``w.step``, ``w.state`` and the runtime's own
        counters; fix here what must not be copied (a residual that is the donor's own
        error, a stream that must be the worker's own). Default: nothing."""

    def on_exchange(self, w: Worker, src: int, payload: Any) -> Reply | Deferred:
        """Answer an :class:`Exchange` from ``src``; runs on ``w`` when it arrives."""
        raise NotImplementedError(f"{self.name} does not answer exchanges")

    def on_exchange_batch(self, ws: list[Worker], srcs: list[int],
                          payloads: list[Any]) -> list[Reply | Deferred]:
        """Answer several exchanges that reach DISTINCT workers at the same time: must
        return, and leave in the workers, exactly what :meth:`on_exchange` on each in
        order would (the simulator calls it; a handler touches its own worker only, so
        distinct workers' handlers commute). Override to batch the tensor work."""
        return [self.on_exchange(w, s, p) for w, s, p in zip(ws, srcs, payloads, strict=True)]
