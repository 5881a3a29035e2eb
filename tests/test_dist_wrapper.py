"""The drop-in wrapper: a plain user loop gives the parameters of ``relaxsgd run``.

The worker side is this file's ``__main__``: a user's loop (their model from the task's
factory, ``torch.optim.SGD``, ``loss.backward(); opt.step()``) on the data order of the
relaxsgd sampler, wrapped with ``relaxsgd.distributed.wrap``; several configs one after the other
in the same processes (one wrap each).
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

import pytest
import torch

from relaxsgd.config import from_dict
from relaxsgd.distributed.launch import LocalJob
from relaxsgd.run import prepare, simulate

pytestmark = pytest.mark.dist

N = 3
BASE: dict[str, Any] = {
    "task": "logreg", "task_options": {"n_train": 480, "n_test": 200, "dim": 8, "classes": 4},
    "steps": 15, "compute": {"step_time_s": 0.002},
    "train": {"batch_size": 8, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
}
CASES = [("allreduce", {}), ("localsgd", {"p": 4, "average_momentum": True}),
         ("olco3", {"s": 1, "compressor": "powersgd:rank=1", "aggregation": "allreduce"}),
         # the parameter server on a thread of rank 0, inside the user's own loop
         ("olco3", {"s": 1, "compressor": "topk:ratio=0.25", "aggregation": "ps"}),
         ("pipesgd", {})]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(algo: str, opts: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, "algo": algo, "algo_options": opts, "workers": N}


def user_main(cases: list[dict[str, Any]], out: str) -> None:
    """One worker: a plain training loop per config, wrapped."""
    import relaxsgd.distributed as rd
    from relaxsgd.bank import SALT_DATA
    from relaxsgd.training import Sampler, seeded_generator

    rank, n, _ = rd.init()
    torch.set_num_threads(1)
    for k, d in enumerate(cases):
        prep = prepare(from_dict(d))
        cfg, t = prep.cfg, prep.cfg.train
        torch.manual_seed(cfg.seed)
        model = prep.spec.model_fn()
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                              weight_decay=t.weight_decay)
        relaxed = rd.wrap(model, opt, cfg.algo, total_steps=prep.total_steps,
                          options=cfg.algo_options, seed=cfg.seed)
        sampler = Sampler(prep.shards[rank], seeded_generator(cfg.seed, rank, SALT_DATA))
        x, y = prep.spec.data.x_train, prep.spec.data.y_train
        for _ in range(prep.total_steps):
            idx = sampler.next(t.batch_size)
            opt.zero_grad()
            prep.spec.loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        try:
            opt.step()
            extra_step_refused = False
        except RuntimeError:
            extra_step_refused = True
        relaxed.finish()
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.save({"x": flat, "refused": extra_step_refused, "stats": relaxed.stats()},
                   os.path.join(out, f"{k}-rank{rank}.pt"))


@pytest.mark.timeout(120)
def test_user_loop_with_the_wrapper_gives_the_parameters_of_relaxsgd_run(tmp_path) -> None:
    cases = [_cfg(a, o) for a, o in CASES]
    job = LocalJob([sys.executable, os.path.abspath(__file__), json.dumps(cases),
                    str(tmp_path)], N, log_dir=str(tmp_path / "logs"))
    try:
        codes = job.wait(timeout=90, grace=3)
    finally:
        job.stop(grace=1)
    assert codes == [0] * N, "\n".join(job.output(r) for r in range(N))
    for k, d in enumerate(cases):
        sim = simulate(prepare(from_dict(d)))  # what `relaxsgd run` computes
        got = [torch.load(tmp_path / f"{k}-rank{r}.pt") for r in range(N)]
        X = torch.stack([g["x"] for g in got])
        torch.testing.assert_close(X, sim.bank.X, rtol=1e-5, atol=2e-6, msg=d["algo"])
        assert all(g["refused"] for g in got)  # a step beyond total_steps is an error
        assert all(g["stats"]["step"] == d["steps"] for g in got)
        assert (sum(g["stats"]["bytes_sent"] + g["stats"]["server_bytes"] for g in got)
                == sim.result["final"]["bytes_sent_total"])


@pytest.mark.timeout(120)
def test_the_example_trains_under_the_launcher(tmp_path) -> None:
    script = os.path.join(ROOT, "examples", "train_with_wrapper.py")
    job = LocalJob([sys.executable, script, "--algo", "localsgd", "--opt", "p=4",
                    "--epochs", "4"], 2, log_dir=str(tmp_path))
    try:
        codes = job.wait(timeout=90, grace=3)
    finally:
        job.stop(grace=1)
    logs = [job.output(r) for r in range(2)]
    assert codes == [0, 0], "\n".join(logs)
    accs = [float(re.search(r"test accuracy ([0-9.]+)", lg).group(1)) for lg in logs]
    assert accs[0] == accs[1]  # Local SGD ends on an average: the same model everywhere
    assert accs[0] > 0.8
    assert "UserWarning" not in "".join(logs)


if __name__ == "__main__":
    user_main(json.loads(sys.argv[1]), sys.argv[2])
