"""Local training math shared by both runtimes: optimizer, learning-rate schedule, samplers.

Pure functions and small explicit-state classes, so that a worker's whole training state
(parameters, momentum, data position, random generators) is a handful of tensors that
can be checkpointed and compared across runtimes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .checks import require_float, require_int
from .devices import draw
from .errors import ConfigError
from .requires import Needs, check_needs

SCHEDULES = ("constant", "step", "cosine")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class TrainConfig:
    """The local optimizer of every worker: SGD with momentum, or AdamW.

    ``optimizer`` is "sgd" (momentum, ``nesterov``; ``weight_decay`` added to the gradient,
    as torch.optim.SGD) or "adamw" (Loshchilov and Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019, as torch.optim.AdamW: ``betas``, ``eps``, and
    ``weight_decay`` decoupled, x <- x (1 - lr wd)). Either optimizer's state (momentum;
    AdamW's two moments and its step count) is the worker's own, in the parameter bank.

    ``lr`` is the peak learning rate; ``warmup_steps`` ramps it linearly from lr/10...lr
    (Goyal et al. 2017); ``schedule`` is "constant", "step" (multiply by ``gamma`` at each
    of ``milestones``, given as fractions of the run) or "cosine" (to zero at the end).
    Momentum buffers are local to each worker and never averaged.
    """

    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_steps: int = 0
    milestones: tuple[float, ...] = field(default=(0.5, 0.75))
    gamma: float = 0.1
    optimizer: str = "sgd"
    betas: tuple[float, ...] = field(default=(0.9, 0.999))
    eps: float = 1e-8

    NEEDS = (Needs("milestones", lambda c: c.schedule == "step", "train.schedule=step"),
             Needs("gamma", lambda c: c.schedule == "step", "train.schedule=step"),
             Needs("betas", lambda c: c.optimizer == "adamw", "train.optimizer=adamw"),
             Needs("eps", lambda c: c.optimizer == "adamw", "train.optimizer=adamw"),
             Needs("nesterov", lambda c: c.momentum > 0, "train.momentum > 0"))

    def __post_init__(self) -> None:
        require_int(self.batch_size, "batch size (train.batch_size)", at_least=1)
        require_float(self.lr, "learning rate (train.lr)", above=0)
        require_float(self.momentum, "momentum (train.momentum)", at_least=0, below=1)
        require_float(self.weight_decay, "weight decay (train.weight_decay)", at_least=0)
        require_float(self.gamma, "train.gamma", above=0)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of: "
                              f"{', '.join(SCHEDULES)}")
        require_int(self.warmup_steps, "train.warmup_steps", at_least=0)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of: "
                              f"{', '.join(OPTIMIZERS)}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers in [0, 1), e.g. [0.9, 0.999], "
                              f"got {list(self.betas)}")
        for b in self.betas:
            require_float(b, "each of train.betas", at_least=0, below=1)
        require_float(self.eps, "train.eps", above=0)
        if self.optimizer == "adamw" and (self.momentum or self.nesterov):
            raise ConfigError("momentum and nesterov are SGD's options; AdamW's momentum is "
                              "betas[0] (set train.momentum=0 or train.optimizer=sgd)")
        if any(isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1
               for m in self.milestones):
            raise ConfigError(f"milestones are fractions of the run in (0, 1), "
                              f"got {list(self.milestones)}")
        check_needs(self, "train.")


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """The learning rate of local step ``step`` (0-based) in a run of ``total`` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (0.1 + 0.9 * step / cfg.warmup_steps)
    frac = step / max(total, 1)
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(frac >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        span = max(total - cfg.warmup_steps, 1)
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))
    return cfg.lr


def sgd_update(x: Tensor, m: Tensor, g: Tensor, lr: float | Tensor, cfg: TrainConfig) -> None:
    """In-place SGD step on ``x`` (and its momentum ``m``), as torch.optim.SGD does it.

    ``x``, ``m``, ``g`` have the same shape (one worker's flat vector, or rows of several
    workers with ``lr`` of shape (rows, 1)). ``g`` is not modified.
    """
    d = g
    if cfg.weight_decay:
        d = d + cfg.weight_decay * x
    if cfg.momentum:
        m.mul_(cfg.momentum).add_(d)
        d = d + cfg.momentum * m if cfg.nesterov else m
    if isinstance(lr, Tensor):
        x.sub_(lr * d)
    else:
        x.add_(d, alpha=-lr)


def adamw_update(x: Tensor, m: Tensor, v: Tensor, g: Tensor, lr: float | Tensor,
                 step: int | Tensor, cfg: TrainConfig) -> None:
    """In-place AdamW step on ``x`` with moments ``m``, ``v``, as torch.optim.AdamW does it.

    ``step`` counts this update (1 for the first); with rows of several workers, ``lr``
    and ``step`` are (rows, 1) tensors. ``g`` is not modified.
    """
    b1, b2 = cfg.betas
    x.mul_(1 - lr * cfg.weight_decay)  # decoupled weight decay, before the moments
    m.lerp_(g, 1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    if isinstance(step, Tensor):
        bc1 = 1 - b1 ** step.to(x.dtype)
        bc2 = (1 - b2 ** step.to(x.dtype)).sqrt()
    else:
        bc1, bc2 = 1 - b1 ** step, math.sqrt(1 - b2 ** step)
    denom = (v.sqrt() / bc2).add_(cfg.eps)
    if isinstance(lr, Tensor) or isinstance(step, Tensor):
        x.sub_((lr / bc1) * m / denom)
    else:
        x.addcdiv_(m, denom, value=-lr / bc1)


Layout = list[tuple[str, torch.Size]]


def flat_params(model: nn.Module) -> tuple[Tensor, Layout]:
    """The model's parameters as one flat float tensor (a copy) and their layout."""
    layout = [(name, p.shape) for name, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    return flat.clone(), layout


def bind_params(model: nn.Module, row: Tensor) -> None:
    """Make ``model``'s parameters views into ``row`` (a flat vector) so that writing the
    row changes the model and the optimizer works on flat rows."""
    off = 0
    for p in model.parameters():
        k = p.numel()
        p.data = row[off:off + k].view_as(p)
        off += k
    if off != row.numel():
        raise ValueError(f"row has {row.numel()} elements, model {off}")


def seeded_generator(seed: int, rank: int, salt: int) -> torch.Generator:
    """An independent torch.Generator for (run seed, worker, purpose)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + rank * 7_919 + salt * 104_729) % (2**63 - 1))
    return g


class Sampler:
    """A worker's walk over its own shard: a fresh seeded permutation each pass.

    ``next(b)`` gives the next ``b`` indices (into the full training set), continuing into
    the next permutation when a pass ends, so no sample of a pass is dropped.
    """

    def __init__(self, shard: Tensor, generator: torch.Generator) -> None:
        if shard.numel() == 0:
            raise ConfigError("a worker received no training samples; use fewer workers "
                              "or another split")
        self.shard = shard
        self.gen = generator
        self.perm = shard[draw(torch.randperm, shard.numel(), generator=generator,
                               device=shard.device)]
        self.pos = 0
        self.passes = 0

    def next(self, b: int) -> Tensor:
        if self.pos + b <= self.perm.numel():
            out = self.perm[self.pos:self.pos + b]
            self.pos += b
            return out
        parts = []
        need = b
        while need > 0:
            if self.pos >= self.perm.numel():
                self.perm = self.shard[draw(torch.randperm, self.shard.numel(),
                                                 generator=self.gen, device=self.shard.device)]
                self.pos = 0
                self.passes += 1
            take = min(need, self.perm.numel() - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"perm": self.perm.clone(), "pos": self.pos, "passes": self.passes,
                "gen": self.gen.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.perm, self.pos, self.passes = s["perm"].clone(), s["pos"], s["passes"]
        self.gen.set_state(s["gen"])
