"""Independent references: plain per-worker SGD on the simulator's data order, and plain
versions of the compressors, so that an algorithm's run can be compared with a few lines
of math written without the library's algorithm code."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.func import functional_call

from relaxsgd.bank import SALT_DATA
from relaxsgd.run import prepare, simulate
from relaxsgd.training import Sampler, flat_params, seeded_generator
from simkit import tiny

LR = 0.1


class Reference:
    """Plain per-worker SGD (no momentum, lr ``LR``) on the same data order as the simulator."""

    def __init__(self, algo: str, **over: Any) -> None:
        self.prep = prepare(tiny(algo=algo, **over))
        cfg, spec = self.prep.cfg, self.prep.spec
        assert cfg.train.lr == LR and cfg.train.momentum == 0.0
        torch.manual_seed(cfg.seed)
        self.model = spec.model_fn()
        self.x0, self.layout = flat_params(self.model)
        self.n, self.b = cfg.workers, cfg.train.batch_size
        self.samplers = [Sampler(self.prep.shards[r], seeded_generator(cfg.seed, r, SALT_DATA))
                         for r in range(self.n)]

    def grad(self, r: int, x: torch.Tensor) -> torch.Tensor:
        idx = self.samplers[r].next(self.b)
        xb, yb = self.prep.spec.data.x_train[idx], self.prep.spec.data.y_train[idx]
        x = x.detach().clone().requires_grad_(True)
        params, off = {}, 0
        for name, shape in self.layout:
            params[name] = x[off:off + shape.numel()].view(shape)
            off += shape.numel()
        loss = self.prep.spec.loss_fn(functional_call(self.model, params, (xb,)), yb)
        return torch.autograd.grad(loss, x)[0]

    def step(self, r: int, x: torch.Tensor, steps: int) -> torch.Tensor:
        for _ in range(steps):
            x = x - LR * self.grad(r, x)
        return x

    def local(self, X: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
        for _ in range(steps):
            X = [x - LR * self.grad(r, x) for r, x in enumerate(X)]
        return X

    def run(self) -> Any:
        return simulate(self.prep)

    def check(self, X: list[torch.Tensor], out: Any = None) -> Any:
        out = out if out is not None else simulate(self.prep)
        torch.testing.assert_close(out.bank.X, torch.stack(X), rtol=1e-5, atol=2e-6)
        return out


def mean(X: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(X).mean(0)


def topk(v: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the ceil(ratio * d) largest magnitudes."""
    k = max(1, math.ceil(ratio * v.numel()))
    out = torch.zeros_like(v)
    idx = v.abs().argsort(descending=True)[:k]
    out[idx] = v[idx]
    return out


def sign(v: torch.Tensor) -> torch.Tensor:
    """Scaled sign: mean |v| times the sign (zeros as +)."""
    return v.abs().mean() * torch.where(v < 0, -1.0, 1.0)


COMPRESSORS = {"topk:ratio=0.25": lambda v: topk(v, 0.25), "sign": sign}
