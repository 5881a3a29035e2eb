"""Gossip runs for the decentralized family from distinct random initial models: by default
pure gossip (lr 1e-30 changes no float32 parameter), so what is left is the algorithm's
averaging alone; with ``train=`` real local steps, whose displacement of each worker's
model is recorded beside the algorithm (``progress``), for invariants under training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from relaxsgd.bank import Bank
from relaxsgd.metrics import aggregate_worker_metrics, consensus_distance
from relaxsgd.run import prepare
from relaxsgd.sim.compute import ComputeModel
from relaxsgd.sim.engine import Engine
from relaxsgd.sim.network import Network, make_network_config
from relaxsgd.worker import LocalWorker
from simkit import TINY, tiny

NO_STEP = {"lr": 1e-30, "momentum": 0.0}


@dataclass
class GossipRun:
    X0: torch.Tensor
    X: torch.Tensor
    workers: list[LocalWorker]
    engine: Engine
    bank: Bank
    algo: Any
    metrics: dict[str, float]
    progress: torch.Tensor  # per worker: the sum of what its local steps moved its model


def record_progress(bank: Bank) -> torch.Tensor:
    """Wrap ``bank.local_steps`` so that each row's displacement by local steps adds up in
    the returned tensor (the simulator computes eagerly, so nothing else moves the rows
    during the call)."""
    progress = torch.zeros_like(bank.X, dtype=torch.float64)
    inner = bank.local_steps

    def local_steps(rows, steps):
        before = bank.X[list(rows)].double()
        loss = inner(rows, steps)
        progress[list(rows)] += bank.X[list(rows)].double() - before
        return loss

    bank.local_steps = local_steps
    return progress


def gossip_run(algo: str, options: dict | None = None, *, workers: int = 6,
               steps: int = 20, topology: str = "ring", topology_options: dict | None = None,
               seed: int = 0, scale: float = 1.0, train: dict | None = None,
               **over: Any) -> GossipRun:
    """Run ``algo`` from models ``x0 + scale * N(0, I)`` (one draw per worker).

    SwarmSGD runs unquantized unless ``options`` name a quantizer (its default is the
    8-bit lattice since issue 11; these tests check exact averaging)."""
    if algo == "swarm":
        options = {"quantizer": "none", **(options or {})}
    cfg = tiny(algo=algo, algo_options=options or {}, workers=workers, steps=steps,
               topology=topology, topology_options=topology_options or {}, seed=seed,
               train=train or NO_STEP, **over)
    prep = prepare(cfg)
    bank = Bank(prep.spec, cfg.train, list(range(workers)), prep.shards, cfg.seed,
                prep.total_steps, batching=cfg.batching)
    prep.info.dim = bank.d
    g = torch.Generator().manual_seed(1234 + seed)
    bank.X.add_(scale * torch.randn(bank.X.shape, generator=g))
    X0 = bank.X.clone()
    progress = record_progress(bank)
    ws = [LocalWorker(bank, r, workers, cfg.seed, prep.total_steps) for r in range(workers)]
    for w in ws:
        prep.algo.init_worker(w)
    net = Network(make_network_config(cfg.network, **cfg.network_options), workers, cfg.seed)
    comp = ComputeModel(cfg.compute, workers, cfg.seed, cfg.compute.step_time_s)
    engine = Engine(prep.algo, ws, bank, net, comp)
    engine.run()
    return GossipRun(X0, bank.X.clone(), ws, engine, bank, prep.algo,
                     aggregate_worker_metrics(ws), progress)


def conf(**over: Any) -> Any:
    """Like simkit.tiny, but a given ``task_options`` (or ``train``) replaces TINY's."""
    from relaxsgd.config import from_dict

    d = {**TINY, **over}
    if "task" in over and "task_options" not in over:
        d["task_options"] = {}
    return from_dict(d)


def cd(X: torch.Tensor) -> float:
    return consensus_distance(X.double())
