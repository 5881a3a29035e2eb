"""How close the simulator runs to the physical limit of a device.

For the MNIST-1D MLP (40-256-256-10), the 1-D CNN and logistic regression (32 features,
10 classes; ``--models logreg``) at 64, 1,024 and 8,192 workers, and the
Shakespeare transformer at 64 (when ``/work/shared/data/shakespeare`` or ``--data-dir``
has ``plays.txt.gz``), it prints the simulator's throughput in worker-steps per second
running Local SGD (p = 8), all-reduce SGD and SwarmSGD, next to the limit measured on the
same device in the same run: the same number of steps of the same models (batch 32, each
worker on its own shard, the task's optimizer) as ONE vmapped call per step over the
stacked workers (``torch.func.vmap`` of ``functional_call``), with no protocol, no event
engine and no per-worker Python. ``ratio`` = simulator / limit. The simulator's time is
its event loop's wall time, evaluations excluded.

    python benchmarks/sim_overhead.py --device cuda          # the full table (a GPU)
    python benchmarks/sim_overhead.py --quick --device cpu   # a CPU in minutes

Goals (issue 17): on a GPU, at 1,024 MLP workers, >= 0.5 of the limit for Local SGD and
all-reduce SGD and >= 0.25 for SwarmSGD; on the CPU no slower than before. The script
uses only what every version of relaxsgd since the simulator's vmap path has (``prepare``,
``simulate``, ``engine_wall_s``) and passes ``device`` only when it is not ``cpu``, so
the same file measures an older checkout side by side (``PYTHONPATH=<old>/src``).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch
from torch.func import functional_call, grad_and_value, vmap

from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate
from relaxsgd.training import adamw_update, sgd_update

SHAKESPEARE = "/work/shared/data/shakespeare"
ALGOS = [("localsgd", {"p": 8}), ("allreduce", {}), ("swarm", {})]


def models(data_dir: str | None) -> list[tuple[str, str, dict[str, Any], str | None]]:
    out = [("mlp", "mnist1d", {"model": "mlp", "hidden": [256, 256]}, None),
           ("cnn", "mnist1d", {"model": "cnn"}, None),
           ("logreg", "logreg", {"dim": 32, "classes": 10}, None)]
    lm = data_dir or SHAKESPEARE
    if os.path.isfile(os.path.join(lm, "plays.txt.gz")):
        out.append(("transformer", "shakespeare", {"sample_chars": 0}, lm))
    return out


def config(task: str, opts: dict[str, Any], data_dir: str | None, n: int, steps: int,
           algo: str, algo_options: dict[str, Any], device: str) -> Any:
    opts = dict(opts)
    if task == "mnist1d":  # enough samples for n shards of at least one batch each
        opts["num_samples"] = max(4000, 40 * n)  # 80% train: 32 n
    elif task == "logreg":
        opts["n_train"], opts["n_test"] = max(4000, 32 * n), 1000
    d = {"algo": algo, "algo_options": algo_options, "task": task, "task_options": opts,
         "data_dir": data_dir, "workers": n, "steps": steps, "evals": 1,
         "eval_samples": 64, "compute": {"step_time_s": 0.01}, "network": "cloud",
         "train": {"batch_size": 32} if task == "mnist1d" else {}}
    if device != "cpu":  # older checkouts have no device key (and only the CPU)
        d["device"] = device
    return from_dict(d)


def sim_rate(cfg: Any) -> tuple[float, str]:
    out = simulate(prepare(cfg))
    return cfg.workers * cfg.steps / max(out.engine_wall_s, 1e-9), out.result["batching"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def limit_rate(cfg: Any, device: torch.device) -> float:
    """Worker-steps/s of one vmapped step of all workers: no protocol, no simulator."""
    prep = prepare(cfg)
    spec, n, train = prep.spec, cfg.workers, cfg.train
    torch.manual_seed(cfg.seed)
    model = spec.model_fn().to(device)
    layout = [(name, p.shape) for name, p in model.named_parameters()]
    X = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    X = X.to(device).repeat(n, 1)
    M, V = torch.zeros_like(X), torch.zeros_like(X)
    share = min(s.numel() for s in prep.shards)
    shards = torch.stack([s[:share] for s in prep.shards]).to(device)
    xs, ys = spec.data.x_train.to(device), spec.data.y_train.to(device)

    def loss(params: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor
             ) -> torch.Tensor:
        return spec.loss_fn(functional_call(model, params, (xb,)), yb)

    vg = vmap(grad_and_value(loss))
    b = train.batch_size
    cols = torch.arange(b, device=device)

    def step(s: int) -> None:
        idx = shards[:, (s * b + cols) % share]
        params, off = {}, 0
        for name, shape in layout:
            k = shape.numel()
            params[name] = X[:, off:off + k].view(n, *shape)
            off += k
        g, _ = vg(params, xs[idx], ys[idx])
        flat = torch.cat([g[name].reshape(n, -1) for name, _ in layout], dim=1)
        if train.optimizer == "adamw":
            adamw_update(X, M, V, flat, train.lr, s + 1, train)
        else:
            sgd_update(X, M, flat, train.lr, train)

    step(0)  # warm-up (allocator, kernels)
    sync(device)
    t0 = time.perf_counter()
    for s in range(1, cfg.steps + 1):
        step(s)
    sync(device)
    return n * cfg.steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer workers and steps")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K (default cpu)")
    ap.add_argument("--data-dir", help="folder of plays.txt.gz (the transformer's rows)")
    ap.add_argument("--models", default="mlp,cnn,transformer",
                    help="comma-separated subset of mlp, cnn, transformer, logreg")
    ap.add_argument("--algos", default=",".join(a for a, _ in ALGOS),
                    help="comma-separated subset of localsgd, allreduce, swarm")
    ap.add_argument("--workers", help="comma-separated worker counts (default: by model)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    # --quick (a loaded 2-core CPU in minutes): the MLP at 64 and 256 workers, the CNN at
    # 64, the transformer at 8 (its vmapped limit at 64 workers needs several GB)
    sizes = {"mlp": [64, 256], "cnn": [64], "transformer": [8], "logreg": [256]} \
        if args.quick else {"mlp": [64, 1024, 8192], "cnn": [64, 1024, 8192],
                            "transformer": [64], "logreg": [1024, 8192]}
    if args.workers:
        sizes = {k: [int(v) for v in args.workers.split(",")] for k in sizes}
    algos = [(a, o) for a, o in ALGOS if a in args.algos.split(",")]
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread; "
          "worker-steps/s (higher is better); ratio = simulator / vmapped limit; "
          f"load {os.getloadavg()[0]:.1f}")
    head = (f"{'model':<12} {'n':>5} {'steps':>5} {'limit':>9} {'algorithm':<10} "
            f"{'batching':<8} {'simulator':>9} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    chosen = args.models.split(",")
    for label, task, opts, data_dir in models(args.data_dir):
        if label not in chosen:
            continue
        for n in sizes[label]:
            steps = steps_for(label, n, args.quick, device)
            base = config(task, opts, data_dir, n, steps, "localsgd", {"p": 8}, args.device)
            limit = limit_rate(base, device)
            for algo, algo_opts in algos:
                cfg = config(task, opts, data_dir, n, steps, algo, algo_opts, args.device)
                rate, used = sim_rate(cfg)
                print(f"{label:<12} {n:>5} {steps:>5} {limit:>9.0f} {algo:<10} {used:<8} "
                      f"{rate:>9.0f} {rate / limit:>6.2f}", flush=True)


def steps_for(label: str, n: int, quick: bool, device: torch.device) -> int:
    """Steps per worker: enough for a stable rate, few enough for a CPU in --quick."""
    if device.type == "cuda":
        return 16 if label == "transformer" else 32
    base = {"mlp": 16, "cnn": 8, "transformer": 2, "logreg": 16}[label]
    return max(2, base * 64 // n) if quick else base


if __name__ == "__main__":
    main()
