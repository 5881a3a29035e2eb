"""What batching SwarmSGD's concurrent interactions saves: the partner side of g exchanges
that arrive at the same virtual time, one ``on_exchange`` call each against one
``on_exchange_batch`` call (decode of g lattice requests, coding of g replies).

For each model and g it builds 2g workers of a simulation (not run), gives each pair a
quantized request (worker g + i to worker i, 8-bit lattice, per-tensor eps), then times the
two paths alternately on the same requests (``--reps`` rounds, the fastest kept) and
prints microseconds per interaction and their ratio. The two paths give the same replies
bit for bit (tests/test_gossip_batch.py); this measures only their cost.

    python benchmarks/gossip_batch.py                 # logreg and the MNIST-1D MLP, CPU
    python benchmarks/gossip_batch.py --device cuda   # the same on a GPU
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from relaxsgd.config import from_dict
from relaxsgd.run import prepare
from relaxsgd.simulation import Simulation

MODELS = {"logreg": ("logreg", {"dim": 32, "classes": 10}),
          "mlp": ("mnist1d", {"model": "mlp", "hidden": [256, 256]})}


def setup(model: str, g: int, device: str) -> tuple[Any, list, list[int], list]:
    task, opts = MODELS[model]
    opts = dict(opts)
    if task == "mnist1d":
        opts["num_samples"] = max(4000, 80 * g)
    else:
        opts["n_train"] = max(4000, 64 * g)
    cfg = from_dict({"algo": "swarm", "task": task, "task_options": opts, "workers": 2 * g,
                     "steps": 4, "compute": {"step_time_s": 0.01}, "device": device})
    sim = Simulation(prepare(cfg))
    algo, ws = sim.prep.algo, sim.workers
    gen = torch.Generator().manual_seed(0)
    for w in ws:  # models a little apart, as after some training, and a spread seen
        noise = 1e-3 * torch.randn(w.params.shape, generator=gen).to(w.params.device)
        w.params.add_(noise)
        w.state["xhat"].copy_(w.params)
        w.state["spread"] = [4e-3] * len(algo.codec.sizes)
    reqs = []
    for i in range(g):
        src = ws[g + i]
        msg, _, _ = algo.codec.encode(src, i, src.state["xhat"].clone(), src.rng)
        msg.update(op="avg", stale=0, seq=1)
        reqs.append(msg)
    return algo, ws[:g], list(range(g, 2 * g)), reqs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="logreg,mlp")
    ap.add_argument("--sizes", default="8,32,128", help="interactions at one instant")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, device {args.device}, 1 thread, load "
          f"{os.getloadavg()[0]:.1f}; us per interaction (partner side), fastest of "
          f"{args.reps}")
    print(f"{'model':<8} {'g':>5} {'one by one':>11} {'batched':>9} {'speed-up':>9}")
    for model in args.models.split(","):
        for g in (int(v) for v in args.sizes.split(",")):
            algo, ws, srcs, reqs = setup(model, g, args.device)
            best = {"one": float("inf"), "batch": float("inf")}
            for _ in range(args.reps):
                for how in ("one", "batch"):
                    sync(args.device)
                    t0 = time.perf_counter()
                    if how == "one":
                        out = [algo.on_exchange(w, s, p)
                               for w, s, p in zip(ws, srcs, reqs, strict=True)]
                    else:
                        out = algo.on_exchange_batch(ws, srcs, reqs)
                    sync(args.device)
                    best[how] = min(best[how], time.perf_counter() - t0)
                    assert all(r.payload["status"] == "ok" for r in out)
            one, batch = (1e6 * best[k] / g for k in ("one", "batch"))
            print(f"{model:<8} {g:>5} {one:>11.0f} {batch:>9.0f} {one / batch:>8.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
