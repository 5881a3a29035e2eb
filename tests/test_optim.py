"""The local optimizers as explicit state: AdamW in the bank equals torch.optim.AdamW step
for step, all-reduce AdamW on n workers is one AdamW model on the union of the batches,
vmap and loop batching agree, and the options are checked."""

from __future__ import annotations

import pytest
import torch

from lmkit import TINY_LM, write_corpus
from relaxsgd.bank import SALT_DATA, Bank
from relaxsgd.config import from_dict
from relaxsgd.errors import ConfigError
from relaxsgd.run import prepare, simulate
from relaxsgd.tasks import TASKS
from relaxsgd.training import Sampler, TrainConfig, flat_params, lr_at, seeded_generator
from simkit import tiny

ADAMW = {"optimizer": "adamw", "lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6,
         "weight_decay": 0.3, "warmup_steps": 3, "schedule": "cosine", "batch_size": 4}


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return folder, TASKS.get("shakespeare")(dict(TINY_LM), str(folder), 0)


def _torch_adamw(spec, seed: int, train: TrainConfig, total: int, samplers, steps: int
                 ) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    """One model trained by torch.optim.AdamW on the concatenated batches of ``samplers``."""
    torch.manual_seed(seed)  # the bank's initial model
    model = spec.model_fn()
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=train.betas, eps=train.eps,
                            weight_decay=train.weight_decay)
    x, y = spec.data.x_train, spec.data.y_train
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(train, t, total)
        idx = torch.cat([s.next(train.batch_size) for s in samplers])
        opt.zero_grad()
        spec.loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
    return model, opt


def test_adamw_state_in_the_bank_equals_torch_adamw_step_for_step(lm) -> None:
    _, spec = lm
    train = TrainConfig(**ADAMW)
    shard = torch.arange(spec.data.x_train.shape[0])
    bank = Bank(spec, train, [0], [shard], seed=3, total_steps=12, batching="loop")
    ref_sampler = Sampler(shard, seeded_generator(3, 0, SALT_DATA))
    model, opt = _torch_adamw(spec, 3, train, 12, [ref_sampler], 0)
    for t in range(12):
        bank.local_steps([0], 1)
        for group in opt.param_groups:
            group["lr"] = lr_at(train, t, 12)
        idx = ref_sampler.next(train.batch_size)
        opt.zero_grad()
        spec.loss_fn(model(spec.data.x_train[idx]), spec.data.y_train[idx]).backward()
        opt.step()
        torch.testing.assert_close(bank.X[0], flat_params(model)[0], rtol=1e-5, atol=1e-6)
    params = list(model.parameters())
    st = bank.optimizer_state(0)
    torch.testing.assert_close(st["exp_avg"], torch.cat(
        [opt.state[p]["exp_avg"].reshape(-1) for p in params]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st["exp_avg_sq"], torch.cat(
        [opt.state[p]["exp_avg_sq"].reshape(-1) for p in params]), rtol=1e-5, atol=1e-9)
    assert st["step"] == 12 == int(opt.state[params[0]]["step"])


@pytest.mark.parametrize("n", [2, 3])
def test_allreduce_adamw_on_n_workers_is_one_adamw_on_the_union_of_batches(lm, n) -> None:
    folder, spec = lm
    cfg = from_dict({"task": "shakespeare", "task_options": dict(TINY_LM),
                     "data_dir": str(folder), "algo": "allreduce", "workers": n, "steps": 10,
                     "evals": 1, "compute": {"step_time_s": 0.01}, "train": ADAMW,
                     "seed": 4, "eval_samples": 8})
    prep = prepare(cfg)
    sim = simulate(prep)
    samplers = [Sampler(prep.shards[r], seeded_generator(4, r, SALT_DATA)) for r in range(n)]
    model, _ = _torch_adamw(prep.spec, 4, cfg.train, 10, samplers, 10)
    for r in range(n):
        torch.testing.assert_close(sim.bank.X[r], flat_params(model)[0], rtol=1e-4,
                                   atol=1e-5)


def test_vmap_and_loop_batching_give_the_same_adamw_steps() -> None:
    cfg = tiny(train={**ADAMW, "lr": 0.05}, algo="localsgd", algo_options={"p": 3},
               steps=9)
    a = simulate(prepare(from_dict({**cfg.to_dict(), "batching": "vmap"})))
    b = simulate(prepare(from_dict({**cfg.to_dict(), "batching": "loop"})))
    assert a.bank.batching == "vmap" and b.bank.batching == "loop"
    torch.testing.assert_close(a.bank.X, b.bank.X, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.bank.V, b.bank.V, rtol=1e-5, atol=1e-8)
    assert a.bank.V.abs().sum() > 0


def test_moments_stay_local_under_local_sgd(lm) -> None:
    folder, _ = lm
    cfg = from_dict({"task": "shakespeare", "task_options": dict(TINY_LM),
                     "data_dir": str(folder), "algo": "localsgd", "algo_options": {"p": 4},
                     "workers": 2, "steps": 8, "evals": 1, "compute": {"step_time_s": 0.01},
                     "split": "play", "eval_samples": 8})
    sim = simulate(prepare(cfg))
    torch.testing.assert_close(sim.bank.X[0], sim.bank.X[1])  # averaged
    assert not torch.allclose(sim.bank.V[0], sim.bank.V[1])  # each its own data's moments
    assert not torch.allclose(sim.bank.M[0], sim.bank.M[1])


def test_sgd_keeps_no_second_moment() -> None:
    sim = simulate(prepare(tiny()))
    assert sim.bank.V.shape == (4, 0)


@pytest.mark.parametrize("kw,match", [
    ({"optimizer": "adam"}, "unknown optimizer 'adam'; choose one of: sgd, adamw"),
    ({"optimizer": "adamw", "betas": (0.9,)}, "betas must be two numbers"),
    ({"optimizer": "adamw", "betas": (0.9, 1.0)},
     "each of train.betas must be a finite number >= 0 and < 1, got 1.0"),
    ({"optimizer": "adamw", "eps": 0.0}, "train.eps must be a finite number > 0"),
    ({"optimizer": "adamw", "momentum": 0.9}, "momentum and nesterov are SGD's"),
])
def test_bad_optimizer_options(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_bad_optimizer_on_the_command_line_is_one_line(capsys) -> None:
    from relaxsgd.cli import main

    code = main(["run", "--task", "logreg", "--steps", "1", "--set", "train.optimizer=adam"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown optimizer 'adam'" in err
