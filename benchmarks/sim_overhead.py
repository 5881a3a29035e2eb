"""How close the simulator runs to the physical limit of this machine.

For 16 and 64 workers on logistic regression, the MLP (MNIST-1D) and the small CNN (MNIST,
or scikit-learn digits when the MNIST files are absent), it prints the simulator's
throughput in worker-steps per second, running Local SGD (p = 8) and all-reduce SGD, next to
the physical limit measured in the same run: the same number of gradient steps of the same
model (same batch size, same data) in a tight per-worker loop with torch.optim.SGD and no
protocol at all. For models the simulator vmaps, it also runs the simulator forced to a
per-worker loop, to show what vmap buys. Ratios >= 0.9 meet the goal (DESIGN.md).

    python benchmarks/sim_overhead.py            # full table
    python benchmarks/sim_overhead.py --quick    # fewer steps, 16 workers only
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from relaxsgd.bank import SALT_DATA
from relaxsgd.config import from_dict
from relaxsgd.run import prepare, simulate
from relaxsgd.training import Sampler, seeded_generator

MNIST_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def models() -> list[tuple[str, str, dict[str, Any], str | None]]:
    have_mnist = os.path.isdir(MNIST_DIR)
    cnn = (("cnn (mnist)", "mnist", {"model": "cnn", "n_train": 6000, "n_test": 500},
            MNIST_DIR) if have_mnist else
           ("cnn (digits)", "digits", {"model": "cnn"}, None))
    return [
        ("logreg", "logreg", {"n_train": 8000, "n_test": 500}, None),
        ("mlp (mnist1d)", "mnist1d", {"model": "mlp"}, None),
        cnn,
    ]


def config(task: str, opts: dict[str, Any], data_dir: str | None, n: int, steps: int,
           algo: str, batching: str) -> Any:
    algo_options = {"p": 8} if algo == "localsgd" else {}
    return from_dict({
        "algo": algo, "algo_options": algo_options, "task": task, "task_options": opts,
        "data_dir": data_dir, "workers": n, "steps": steps, "evals": 1, "eval_samples": 200,
        "compute": {"step_time_s": 0.01}, "batching": batching, "network": "cloud",
        "train": {"batch_size": 32, "lr": 0.05, "momentum": 0.9},
    })


def sim_rate(cfg: Any) -> tuple[float, str]:
    out = simulate(prepare(cfg))
    # the event loop's wall time, evaluations excluded (set-up is not part of a step)
    return cfg.workers * cfg.steps / out.engine_wall_s, out.result["batching"]


def limit_rate(cfg: Any) -> float:
    """The same gradient steps in a tight per-worker loop: no protocol, no simulator."""
    prep = prepare(cfg)
    torch.manual_seed(cfg.seed)
    proto = prep.spec.model_fn()
    ms = []
    for _ in range(cfg.workers):
        m = prep.spec.model_fn()
        m.load_state_dict(proto.state_dict())
        ms.append((m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)))
    samplers = [Sampler(prep.shards[r], seeded_generator(cfg.seed, r, SALT_DATA))
                for r in range(cfg.workers)]
    x, y = prep.spec.data.x_train, prep.spec.data.y_train
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        for (m, opt), s in zip(ms, samplers, strict=True):
            idx = s.next(32)
            opt.zero_grad()
            prep.spec.loss_fn(m(x[idx]), y[idx]).backward()
            opt.step()
    return cfg.workers * cfg.steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [16] if args.quick else [16, 64]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; worker-steps/s "
          "(higher is better); ratio = simulator / tight loop")
    head = f"{'model':<14} {'n':>3} {'steps':>5} {'limit':>9} {'algorithm':<10} " \
           f"{'batching':<8} {'simulator':>9} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for label, task, opts, data_dir in models():
        for n in sizes:
            conv = label.startswith("cnn")
            steps = (8 if args.quick else 16) if conv else (40 if args.quick else 100)
            base = config(task, opts, data_dir, n, steps, "localsgd", "auto")
            limit = limit_rate(base)
            runs = [("localsgd", "auto"), ("allreduce", "auto")]
            if not conv:
                runs.append(("localsgd", "loop"))
            for algo, batching in runs:
                rate, used = sim_rate(config(task, opts, data_dir, n, steps, algo, batching))
                print(f"{label:<14} {n:>3} {steps:>5} {limit:>9.0f} {algo:<10} {used:<8} "
                      f"{rate:>9.0f} {rate / limit:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
