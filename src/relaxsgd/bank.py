"""The parameter bank: the models of the workers one process holds, as rows of one tensor.

Row ``k`` of ``X`` (shape ``(rows, d)``) is the flat parameter vector of worker
``ranks[k]``; the local optimizer's state is rows too, so that both runtimes and
checkpoints find it: ``M`` holds SGD's momentum or AdamW's first moment, ``V`` AdamW's
second moment (``(rows, 0)`` under SGD), and ``steps[k]`` the local steps done (AdamW's
step count for its bias corrections). The simulator holds every worker (rows = n); the
distributed runtime holds one. Gradients of several workers are computed either with
``torch.func.vmap`` over the stacked rows (one batched call: pays for small buffer-free
models on a CPU, and every model on a GPU) or with a loop over per-worker
modules whose parameters are views of the rows (on a CPU the convolutional and
transformer models, measured faster so). Models with buffers (BatchNorm) are vmapped too:
each buffer is stacked over the rows (``B``) and passed to ``functional_call`` with the
parameters, so that every row normalises with its own batch statistics and updates its own
running statistics, as its own module would. The choice is per task on a CPU
(``TaskSpec.batching``), vmap on a GPU, or forced by the run config; both give the same
numbers up to float rounding (tests/test_sim_device.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from . import salts
from .stacked_sampler import StackedSamplers
from .tasks.base import TaskSpec
from .training import (
    Sampler,
    TrainConfig,
    adamw_update,
    bind_params,
    flat_params,
    lr_at,
    seeded_generator,
)
from .training import sgd_update as _sgd

SALT_DATA, SALT_AUGMENT = salts.DATA, salts.AUGMENT


class Bank:
    """Parameters, momentum, data samplers and gradient machinery of some workers."""

    def __init__(self, spec: TaskSpec, train: TrainConfig, ranks: Sequence[int],
                 shards: Sequence[Tensor], seed: int, total_steps: int,
                 batching: str = "auto", device: str | torch.device = "cpu") -> None:
        self.spec, self.train, self.ranks = spec, train, list(ranks)
        self.total_steps = total_steps
        self.device = torch.device(device)
        torch.manual_seed(seed)  # identical initial model on every worker and runtime
        self.template = spec.model_fn().to(self.device)
        x0, self.layout = flat_params(self.template)
        self.d = x0.numel()
        rows = len(self.ranks)
        self.X = x0.to(self.device).repeat(rows, 1)
        self.M = torch.zeros_like(self.X)
        self.V = torch.zeros_like(self.X) if train.optimizer == "adamw" else self.X[:, :0]
        self.steps = [0] * rows
        self.samples = [0] * rows  # training samples processed, per row
        self.samplers = [Sampler(shards[r], seeded_generator(seed, r, SALT_DATA))
                         for r in self.ranks]
        self.aug_gens = [seeded_generator(seed, r, SALT_AUGMENT) for r in self.ranks]
        # every row's next batch in one gather from the samplers' stacked permutations
        self.stacked = StackedSamplers(self.samplers, train.batch_size, self.device)
        self.xdata = spec.data.x_train.to(self.device)
        self.ydata = spec.data.y_train.to(self.device)
        has_buffers = any(True for _ in self.template.buffers())
        if batching == "auto" and self.device.type != "cpu":
            batching = "vmap"  # on a GPU batching is what pays (issue 17: 0.78k vs 323k/s)
        elif batching == "auto":  # on a CPU the task's measured preference
            batching = spec.batching if spec.batching != "auto" else "loop"
        self.batching = batching
        self.modules: list[nn.Module] = []
        # vmapped models with buffers (BatchNorm): each buffer stacked over the rows, passed
        # to functional_call as a batched input, so that each row's step uses its own batch
        # statistics and writes its own running statistics in place (see _vmap_grads)
        self.B: dict[str, Tensor] = {}
        if batching == "vmap" and has_buffers:
            self.B = {n: b.detach().unsqueeze(0).repeat(rows, *[1] * b.dim()).contiguous()
                      for n, b in self.template.named_buffers()}
        if batching == "loop":
            for k in range(rows):
                m = spec.model_fn().to(self.device)
                m.load_state_dict(self.template.state_dict())
                bind_params(m, self.X[k])
                m.train()
                self.modules.append(m)
        else:
            self._vg = vmap(grad_and_value(self._loss_of_params), randomness="different")
        self.loss_sum = torch.zeros(rows, dtype=torch.float64, device="cpu")  # host-side metric
        self.loss_count = [0] * rows

    # -- gradients -----------------------------------------------------------------
    def _loss_of_params(self, params: dict[str, Tensor], bufs: dict[str, Tensor], xb: Tensor,
                        yb: Tensor) -> Tensor:
        # ``bufs`` (one row's BatchNorm statistics, under vmap a view into the stacked B) are
        # updated in place by the template's training-mode forward, as a module's own are
        out = functional_call(self.template, {**params, **bufs}, (xb,))
        return self.spec.loss_fn(out, yb)

    def _vmap_grads(self, rows: Sequence[int], xb: Tensor, yb: Tensor
                    ) -> tuple[Tensor, Tensor]:
        # Differentiate w.r.t. per-parameter views of the rows, not the flat row: the
        # backward of slicing a flat vector would scatter into a full-size zero tensor per
        # parameter (O(params x d)); measured 1.7x slower on the MNIST-1D MLP.
        X = self._rows(rows)
        g = X.shape[0]
        params, off = {}, 0
        for name, shape in self.layout:
            k = shape.numel()
            params[name] = X[:, off:off + k].view(g, *shape)
            off += k
        whole = X is self.X
        # all rows: the stacked buffers themselves, updated in place; some rows: a gathered
        # copy, written back to those rows after the step
        at = None if whole else torch.tensor(list(rows), device=self.device)
        bufs = self.B if whole else {n: b.index_select(0, at) for n, b in self.B.items()}
        grads, loss = self._vg(params, bufs, xb, yb)
        if not whole:
            for n, b in bufs.items():
                self.B[n].index_copy_(0, at, b)
        flat = torch.cat([grads[name].reshape(g, -1) for name, _ in self.layout], dim=1)
        return flat, loss

    def _indices(self, rows: Sequence[int]) -> Tensor:
        """The next batch of each row's sampler, ``(len(rows), batch)``: exactly
        ``samplers[k].next(batch)`` for each (:class:`.StackedSamplers`)."""
        return self.stacked.indices(rows)

    def _batches(self, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Each row's next training batch, stacked: ``(len(rows), batch, ...)``."""
        idx = self._indices(rows)
        xb, yb = self.xdata[idx], self.ydata[idx]
        if self.spec.augment is not None:  # each worker's own augmentation stream
            xb = torch.stack([self.spec.augment(xb[j], self.aug_gens[k])
                              for j, k in enumerate(rows)])
        return xb, yb

    def grads(self, rows: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Stochastic gradients (rows x d, fresh) and batch losses of these rows' workers."""
        xbs, ybs = self._batches(rows)
        if self.batching == "vmap":
            g, loss = self._vmap_grads(rows, xbs, ybs)
        else:
            g = torch.empty(len(rows), self.d, device=self.device)
            loss = torch.empty(len(rows), device=self.device)
            for j, k in enumerate(rows):
                xb, yb = xbs[j], ybs[j]
                m = self.modules[k]
                m.zero_grad(set_to_none=True)
                lo = self.spec.loss_fn(m(xb), yb)
                lo.backward()
                torch.cat([p.grad.reshape(-1) for p in m.parameters()], out=g[j])
                loss[j] = lo.detach()
        rl = list(rows)
        self.loss_sum[rl] += loss.detach().double().cpu()
        for k in rows:
            self.loss_count[k] += 1
            self.samples[k] += self.train.batch_size
        return g, loss

    def _rows(self, rows: Sequence[int]) -> Tensor:
        if len(rows) == self.X.shape[0] and list(rows) == list(range(len(rows))):
            return self.X
        return self.X[list(rows)]

    # -- optimizer -----------------------------------------------------------------
    def lr(self, k: int) -> float:
        return lr_at(self.train, self.steps[k], self.total_steps)

    def _update(self, x: Tensor, m: Tensor, v: Tensor, g: Tensor, lr: float | Tensor,
                step: int | Tensor) -> None:
        """The configured optimizer's step on rows (or one row) ``x`` with their state."""
        if self.train.optimizer == "adamw":
            adamw_update(x, m, v, g, lr, step, self.train)
        else:
            _sgd(x, m, g, lr, self.train)

    def optimizer_state(self, k: int) -> dict[str, Tensor | int]:
        """Row ``k``'s optimizer state (views; ``exp_avg_sq`` is empty under SGD)."""
        return {"exp_avg": self.M[k], "exp_avg_sq": self.V[k], "step": self.steps[k]}

    def apply_grad(self, k: int, g: Tensor) -> None:
        """One local optimizer step of row ``k`` with gradient ``g``."""
        self._update(self.X[k], self.M[k], self.V[k], g, self.lr(k), self.steps[k] + 1)
        self.steps[k] += 1

    def local_steps(self, rows: Sequence[int], steps: int) -> Tensor:
        """``steps`` local SGD steps for each of these rows (batched when vmapped).

        Returns the batch losses of the last step, one per row.
        """
        loss = torch.empty(0, device=self.device)
        for _ in range(steps):
            g, loss = self.grads(rows)
            if self.batching == "vmap" and len(rows) > 1:
                lrs = torch.tensor([self.lr(k) for k in rows],
                                   device=self.device).unsqueeze(1)
                nth = torch.tensor([self.steps[k] + 1 for k in rows],
                                   device=self.device).unsqueeze(1)
                if self._rows(rows) is self.X:
                    self._update(self.X, self.M, self.V, g, lrs, nth)
                else:
                    rl = list(rows)
                    x, m, v = self.X[rl], self.M[rl], self.V[rl]
                    self._update(x, m, v, g, lrs, nth)
                    self.X[rl], self.M[rl], self.V[rl] = x, m, v
                for k in rows:
                    self.steps[k] += 1
            else:
                for j, k in enumerate(rows):
                    self.apply_grad(k, g[j])
        return loss

    # -- evaluation ----------------------------------------------------------------
    def buffers_of(self, k: int) -> dict[str, Tensor]:
        """Row ``k``'s buffers (BatchNorm statistics), as tensors the caller may write
        (``copy_``) to change them: views into the stacked buffers when vmapped, the
        module's own otherwise; empty for buffer-free models."""
        if self.B:
            return {n: b[k] for n, b in self.B.items()}
        if not self.modules:
            return {}
        return {n: b for n, b in self.modules[k].named_buffers()}

    def mean_buffers(self, rows: list[int] | None = None) -> dict[str, Tensor]:
        """BatchNorm statistics averaged over ``rows`` (None: all), as the mean model of
        those rows is evaluated; under churn only the live workers' rows count, like
        their parameters. Integer buffers (batch counts) are the first row's."""
        if self.B:
            at: slice | list[int] = slice(None) if rows is None else list(rows)
            return {n: b[at].mean(0) if b.is_floating_point() else b[at][0]
                    for n, b in self.B.items()}
        if not self.modules:
            return {}
        mods = self.modules if rows is None else [self.modules[k] for k in rows]
        out = {}
        for name, b in mods[0].named_buffers():
            if b.is_floating_point():
                out[name] = torch.stack([dict(m.named_buffers())[name]
                                         for m in mods]).mean(0)
            else:
                out[name] = b
        return out

    def take_train_loss(self) -> float:
        """Mean training batch loss since the last call (over all rows)."""
        c = sum(self.loss_count)
        v = float(self.loss_sum.sum()) / c if c else float("nan")
        self.loss_sum.zero_()
        self.loss_count = [0] * len(self.loss_count)
        return v


@torch.no_grad()
def evaluate(spec: TaskSpec, model: nn.Module, flat: Tensor, buffers: dict[str, Tensor],
             x: Tensor, y: Tensor, batch: int | None = None) -> tuple[float, float]:
    """(loss, metric) of the model with these flat parameters and buffers on (x, y).

    Accuracy counts every target: for a language model (targets (B, T), logits (B, V, T))
    it is next-token accuracy over all positions. ``batch``: samples per forward pass, or
    tokens for sequences (default :func:`eval_batch`)."""
    bind = {}
    off = 0
    for name, p in model.named_parameters():
        bind[name] = flat[off:off + p.numel()].view_as(p)
        off += p.numel()
    bind.update({k: b.to(flat.device) for k, b in buffers.items()})
    model.eval()
    total, correct, n, targets = 0.0, 0.0, 0, 0
    batch = eval_batch(spec, y, batch)
    for i in range(0, x.shape[0], batch):
        # on the device of the parameters (the data set lives in host memory)
        xb, yb = x[i:i + batch].to(flat.device), y[i:i + batch].to(flat.device)
        out = functional_call(model, bind, (xb,))
        total += float(spec.loss_fn(out, yb)) * xb.shape[0]
        if spec.metric == "accuracy":
            correct += float((out.argmax(1) == yb).sum())
            targets += yb.numel()
        n += xb.shape[0]
    loss = total / max(n, 1)
    metric = correct / max(targets, 1) if spec.metric == "accuracy" else -loss
    return loss, metric


def check_fits(spec: TaskSpec, workers: int) -> None:
    """ConfigError if the bank of ``workers`` copies of the task's model (parameters and
    optimizer state, 4 bytes each) cannot fit in this machine's memory: said in one line
    before anything is allocated, instead of the kernel's OOM killer. The model is built on
    the meta device (no memory) to count its parameters; a model that cannot be built
    there is not checked."""
    import os

    from .errors import ConfigError

    try:
        with torch.device("meta"):
            d = sum(p.numel() for p in spec.model_fn().parameters())
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except Exception:  # noqa: BLE001 - no meta support, no sysconf: not checked
        return
    need = 3 * 4 * workers * d  # parameters, momentum (or AdamW's two moments)
    if need > total:
        raise ConfigError(f"{workers} workers of a {d:,}-parameter model need at least "
                          f"{need / 2**30:.1f} GiB for their parameters and optimizer state; "
                          f"this machine has {total / 2**30:.1f} GiB: use fewer workers or a "
                          "smaller model")


# Evaluation of several models at once: models x samples per vmapped call, bounded so that
# 1,024 workers on a whole test set do not allocate their activations all at once.
EVAL_PAIRS_PER_CALL = 1 << 16


def eval_batch(spec: TaskSpec, y: Tensor, batch: int | None) -> int:
    """Samples per evaluation pass: ``batch``, or by default 500 samples (measured on this
    CPU: the MNIST-1D CNN evaluates 2,000 samples twice as fast in passes of 500-1,000 as
    in one, whose activations overflow the cache) or 2,000 tokens of sequences."""
    if y.dim() > 1 and spec.bits_per_token:  # sequences: ``batch`` counts tokens
        return max(1, (batch or 2000) // int(y[0].numel()))
    return batch or 500


def eval_batched(spec: TaskSpec, device: torch.device) -> bool:
    """Whether :func:`evaluate_many` runs the models together by default."""
    return device.type != "cpu" or spec.batching == "vmap"


@torch.no_grad()
def evaluate_many(spec: TaskSpec, model: nn.Module, X: Tensor,
                  buffers: dict[str, Tensor] | None, x: Tensor, y: Tensor,
                  batch: int | None = None, batched: bool | None = None
                  ) -> tuple[list[float], list[float]]:
    """(losses, metrics) of the models with flat parameter rows ``X`` (g x d) on (x, y),
    the same numbers as :func:`evaluate` on each row up to float rounding.

    ``buffers``: each buffer stacked over the rows (g x ...), or None for buffer-free
    models. ``batched``: the models run together (``torch.func.vmap`` over
    ``functional_call``, in chunks of rows so that rows x batch stays under
    :data:`EVAL_PAIRS_PER_CALL`), or one after the other; None chooses as the training
    does: together on a GPU, and on a CPU for the models the task vmaps (measured on this
    2-core CPU: 16 MNIST-1D CNNs take as long or longer vmapped than in a loop)."""
    g = X.shape[0]
    if batched is None:
        batched = eval_batched(spec, X.device)
    if not batched:
        res = [evaluate(spec, model, X[k], {n: b[k] for n, b in (buffers or {}).items()},
                        x, y, batch) for k in range(g)]
        return [r[0] for r in res], [r[1] for r in res]
    batch = max(1, min(eval_batch(spec, y, batch), x.shape[0]))
    model.eval()
    names = [(name, p.shape) for name, p in model.named_parameters()]
    accuracy = spec.metric == "accuracy"

    def sums(params: dict[str, Tensor], bufs: dict[str, Tensor], xb: Tensor,
             yb: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(model, {**params, **bufs}, (xb,))
        loss = spec.loss_fn(out, yb) * xb.shape[0]
        hits = (out.argmax(1) == yb).sum() if accuracy else loss.new_zeros(())
        return loss, hits

    run = vmap(sums, in_dims=(0, 0, None, None))
    chunk = max(1, EVAL_PAIRS_PER_CALL // batch)
    loss_sum = torch.zeros(g, dtype=torch.float64, device=X.device)
    hit_sum = torch.zeros(g, dtype=torch.float64, device=X.device)
    for a in range(0, g, chunk):
        rows = X[a:a + chunk]
        params, off = {}, 0
        for name, shape in names:
            k = shape.numel()
            params[name] = rows[:, off:off + k].view(rows.shape[0], *shape)
            off += k
        bufs = {k: v[a:a + chunk] for k, v in (buffers or {}).items()}
        for i in range(0, x.shape[0], batch):
            lo, hi = run(params, bufs, x[i:i + batch], y[i:i + batch])
            loss_sum[a:a + chunk] += lo.double()
            hit_sum[a:a + chunk] += hi.double()
    losses = (loss_sum / max(x.shape[0], 1)).tolist()
    if not accuracy:
        return losses, [-v for v in losses]
    return losses, (hit_sum / max(y.numel(), 1)).tolist()
