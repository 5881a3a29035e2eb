"""The replicated-server emulation of ``aggregation: ps``, kept as the tests' reference.

Before the parameter server was real, every worker all-gathered the round's messages and
ran the server's math itself, on a replica of its state (identical on every worker: same
messages, same seeds). :class:`ReplicatedServer` is that emulation, built from the same
pure :class:`~relaxsgd.algorithms.server.ParameterServer` but with none of the real
server's plumbing (no ServerRound, no server node, no rank-0 host): a ring all-gather and a
replica of the server's state in each worker's ``w.state``. :func:`emulated` turns a
prepared run of a ps algorithm into one that uses it.
"""

from __future__ import annotations

from typing import Any

from relaxsgd.algorithms.base import AllGather, Handle, Program, Wait
from relaxsgd.algorithms.efsgd import Aggregator, Delivered


class ReplicatedServer(Aggregator):
    """An Aggregator whose ps rounds are an all-gather + the server's math on every worker."""

    def init_state(self, numel: int, layout: list | None,
                   device: Any = None) -> dict[str, Any]:
        st = super().init_state(numel, layout, device)
        st["replica"] = self.ps.init_state(numel, layout, device)
        return st

    ordered_rounds = True  # (each worker's replica serves the rounds in order)

    def _send(self, st: dict[str, Any], payload: Any, own: Any, res: Any, nb: int,
              prev: Handle | None, rnd: int | None = None) -> Program:
        if prev is not None:
            yield Wait(prev)
        payloads = yield AllGather(payload, nbytes=nb)
        mean, server_res = self.ps.decode(self.ps.serve(st["replica"], payloads))
        return Delivered(mean, own, res, server_res)


def emulated(prep: Any) -> Any:
    """``prep`` (relaxsgd.run.prepare's) with its algorithm's server replaced by the
    replicated emulation (call before simulating)."""
    algo = prep.algo
    assert algo.agg.ps is not None, "not a ps-mode algorithm"
    algo.agg.__class__ = ReplicatedServer
    algo.server = lambda: None  # no server node: the workers run it
    return prep
