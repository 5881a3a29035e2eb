"""All-reduce SGD and Local SGD against independent references."""

from __future__ import annotations

import csv

import torch

from relaxsgd.bank import SALT_DATA
from relaxsgd.run import prepare, run, simulate
from relaxsgd.training import Sampler, seeded_generator
from simkit import tiny


def test_allreduce_sgd_equals_single_model_sgd_with_n_times_the_batch() -> None:
    cfg = tiny(algo="allreduce", steps=6, split="dirichlet",
               train={"momentum": 0.9, "weight_decay": 1e-3, "lr": 0.2})
    prep = prepare(cfg)
    out = simulate(prep)
    # reference: one model, torch.optim.SGD, the union of the workers' batches each step
    torch.manual_seed(cfg.seed)
    model = prep.spec.model_fn()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    samplers = [Sampler(prep.shards[r], seeded_generator(cfg.seed, r, SALT_DATA))
                for r in range(cfg.workers)]
    x, y = prep.spec.data.x_train, prep.spec.data.y_train
    for _ in range(6):
        idx = torch.cat([s.next(cfg.train.batch_size) for s in samplers])
        opt.zero_grad()
        prep.spec.loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    ref = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    for r in range(cfg.workers):
        torch.testing.assert_close(out.bank.X[r], ref, rtol=1e-5, atol=1e-6)


def test_local_sgd_with_p1_equals_allreduce_sgd() -> None:
    a = simulate(prepare(tiny(algo="allreduce", split="shards")))
    b = simulate(prepare(tiny(algo="localsgd", algo_options={"p": 1}, split="shards")))
    torch.testing.assert_close(a.bank.X, b.bank.X, rtol=1e-5, atol=1e-6)


def test_local_sgd_models_differ_between_averages_and_agree_after() -> None:
    out = simulate(prepare(tiny(algo="localsgd", algo_options={"p": 5}, steps=10)))
    X = out.bank.X
    assert torch.equal(X[0], X[3])  # the last thing done was an average
    assert out.rows[-1]["consensus_distance"] < 1e-10
    mid = [r for r in out.rows if r["step"] not in (0, 10)]
    assert all(r["step"] % 5 == 0 for r in mid)


def test_workers_start_from_identical_parameters() -> None:
    prep = prepare(tiny(algo="localsgd", workers=5))
    out = simulate(prepare(tiny(algo="localsgd", workers=5, steps=1,
                                algo_options={"p": 1})))
    assert out.rows[0]["consensus_distance"] < 1e-12
    from relaxsgd.bank import Bank

    bank = Bank(prep.spec, prep.cfg.train, range(5), prep.shards, 0, 10)
    assert all(torch.equal(bank.X[0], bank.X[r]) for r in range(5))


def _rows(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in csv.DictReader(f)]


def test_same_config_and_seed_give_identical_metrics(tmp_path) -> None:
    for algo in ("allreduce", "localsgd"):
        paths = []
        for k in range(2):
            out = str(tmp_path / f"{algo}{k}")
            run(tiny(algo=algo, out=out, split="dirichlet",
                     compute={"heterogeneity": "lognormal"}), progress=False)
            paths.append(f"{out}/metrics.csv")
        a, b = _rows(paths[0]), _rows(paths[1])
        assert len(a) >= 3 and a == b
    other = str(tmp_path / "seed1")
    run(tiny(algo="localsgd", out=other, seed=1, split="dirichlet",
             compute={"heterogeneity": "lognormal"}), progress=False)
    assert _rows(f"{other}/metrics.csv") != a  # the seed matters


def test_vmap_and_loop_batching_agree() -> None:
    a = simulate(prepare(tiny(algo="localsgd", batching="vmap",
                              train={"momentum": 0.9})))
    b = simulate(prepare(tiny(algo="localsgd", batching="loop",
                              train={"momentum": 0.9})))
    assert a.result["batching"] == "vmap" and b.result["batching"] == "loop"
    torch.testing.assert_close(a.bank.X, b.bank.X, rtol=1e-4, atol=1e-5)
