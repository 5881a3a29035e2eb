"""How a training set is divided over workers: iid, label shards, Dirichlet label skew.

:func:`split_indices` returns one int64 index tensor per worker; the tensors are
disjoint, sorted, and (for every kind) together cover the whole training set. The same
(labels, n, kind, seed, ...) always give the same split.

- ``iid``: a seeded random permutation cut into ``n`` parts whose sizes differ by at
  most one (the remainder is spread over the first workers).
- ``shards``: McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017: sort by label (ties in random order), cut into
  ``n * shards_per_worker`` contiguous shards of near-equal size, deal
  ``shards_per_worker`` random shards to each worker, so each worker sees few labels.
- ``dirichlet``: Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", 2019: for each class, the
  proportions of its samples that go to each worker are drawn from
  Dir(alpha * 1_n); a smaller ``alpha`` gives more skew. A worker left with fewer than
  ``min_size`` samples makes the whole split be re-drawn (as in Li et al., "Federated
  Learning on Non-IID Data Silos", 2021); after 100 failed draws (tiny alpha, many
  workers) the last draw is rebalanced instead: random samples move from the largest
  worker to each short one until every worker has ``min_size``.

- ``play``: whole groups (a task's ``groups``, for shakespeare the works) dealt out so
  that every worker gets at least one and the workers' sizes are near-equal: groups in
  decreasing size (ties in random order) each go to the worker with the fewest samples so
  far (Graham's longest-processing-time rule; the largest share is at most 4/3 of the
  optimum). Needs n <= number of groups (a ConfigError says so otherwise: splitting a
  work further would no longer be "whole works"; use ``dirichlet`` then). Shares stay
  uneven when groups are (the 42 works range from 1.8k to 158k training characters: with
  42 workers each holds one work); every worker does the same number of local steps, so
  a worker with a small share passes over it more often.

Regression targets (float labels) are binned into 10 quantile bins for ``shards`` and
``dirichlet``, so that "label skew" means skew of the target's range.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..checks import require_int
from ..errors import ConfigError

SPLITS = ("iid", "shards", "dirichlet", "play")
_REDRAWS = 100  # Dirichlet draws before rebalancing instead
_REGRESSION_BINS = 10


def split_indices(labels: Tensor, n: int, kind: str, seed: int, alpha: float = 0.5,
                  shards_per_worker: int = 2, min_size: int = 1) -> list[Tensor]:
    """Disjoint, covering int64 index tensors, one per worker, each of >= ``min_size``."""
    total = int(labels.shape[0])
    _validate(total, n, kind, alpha, shards_per_worker, min_size)
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(total), n)
    else:
        classes = _class_ids(labels)
        if kind == "shards":
            parts = _shards(classes, n, shards_per_worker, rng)
        elif kind == "play":
            parts = _whole_groups(classes, n, rng)
        else:
            parts = _dirichlet(classes, n, alpha, min_size, rng)
    short = min(len(p) for p in parts)
    if short < min_size:  # only possible for shards: near-equal shards are too small
        raise ConfigError(f"split 'shards' gives a worker only {short} samples, fewer than "
                          f"min_size={min_size}; use fewer workers or shards_per_worker")
    return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]


def _validate(total: int, n: int, kind: str, alpha: float, shards_per_worker: int,
              min_size: int) -> None:
    if kind not in SPLITS:
        raise ConfigError(f"unknown split {kind!r}; choose one of: {', '.join(SPLITS)}")
    require_int(n, "number of workers", at_least=1)
    if n > total:
        raise ConfigError(f"cannot split {total} training samples over {n} workers; "
                          f"use at most {total} workers or a larger training set")
    if not alpha > 0:
        raise ConfigError(f"Dirichlet alpha must be > 0 (e.g. 0.1 skewed, 100 near iid), "
                          f"not {alpha!r}")
    require_int(shards_per_worker, "shards_per_worker", at_least=1)
    if kind == "shards" and n * shards_per_worker > total:
        raise ConfigError(f"cannot cut {total} samples into {n} x {shards_per_worker} "
                          f"shards; use fewer workers or shards_per_worker")
    if require_int(min_size, "min_size", at_least=0) * n > total:
        raise ConfigError(f"min_size={min_size!r} per worker is impossible with {total} "
                          f"samples over {n} workers; use 0 <= min_size <= {total // n}")


def _class_ids(labels: Tensor) -> np.ndarray:
    """Integer class ids (N,); float targets binned by quantiles (see module doc)."""
    y = labels.detach().cpu().reshape(labels.shape[0], -1)
    if y.shape[1] != 1:
        raise ConfigError(f"cannot split by label: labels have shape {tuple(labels.shape)}, "
                          "expected (N,) or (N, 1)")
    y_np = y[:, 0].numpy()
    if not np.issubdtype(y_np.dtype, np.floating):
        return y_np.astype(np.int64)
    edges = np.quantile(y_np, np.linspace(0, 1, _REGRESSION_BINS + 1)[1:-1])
    return np.searchsorted(edges, y_np, side="right").astype(np.int64)


def _shards(classes: np.ndarray, n: int, per: int, rng: np.random.Generator) -> list:
    shuffled = rng.permutation(len(classes))  # random order within each label
    order = shuffled[np.argsort(classes[shuffled], kind="stable")]
    shards = np.array_split(order, n * per)
    deal = rng.permutation(n * per)
    return [np.concatenate([shards[s] for s in deal[w * per:(w + 1) * per]])
            for w in range(n)]


def _whole_groups(classes: np.ndarray, n: int, rng: np.random.Generator) -> list:
    ids, sizes = np.unique(classes, return_counts=True)
    if n > len(ids):
        raise ConfigError(f"split 'play' deals whole works: {n} workers but only {len(ids)} "
                          f"works; use at most {len(ids)} workers, or split 'dirichlet'")
    order = rng.permutation(len(ids))
    order = order[np.argsort(-sizes[order], kind="stable")]
    members: list[list[int]] = [[] for _ in range(n)]
    load = np.zeros(n, dtype=np.int64)
    for g in order:
        w = int(np.argmin(load))  # first least-loaded worker: deterministic
        members[w].append(int(ids[g]))
        load[w] += sizes[g]
    return [np.flatnonzero(np.isin(classes, m)) for m in members]


def _dirichlet(classes: np.ndarray, n: int, alpha: float, min_size: int,
               rng: np.random.Generator) -> list:
    for _ in range(_REDRAWS):
        parts = _dirichlet_draw(classes, n, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    return _rebalance(parts, min_size, rng)


def _dirichlet_draw(classes: np.ndarray, n: int, alpha: float,
                    rng: np.random.Generator) -> list:
    buckets: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in np.unique(classes):
        idx = rng.permutation(np.flatnonzero(classes == c))
        p = rng.dirichlet(np.full(n, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for w, chunk in enumerate(np.split(idx, cuts)):
            buckets[w].append(chunk)
    return [np.concatenate(b) for b in buckets]


def _rebalance(parts: list, min_size: int, rng: np.random.Generator) -> list:
    parts = [rng.permutation(p) for p in parts]
    for w in range(len(parts)):
        while len(parts[w]) < min_size:
            donor = max(range(len(parts)), key=lambda i: len(parts[i]))
            take = min(min_size - len(parts[w]), len(parts[donor]) - min_size)
            parts[w] = np.concatenate([parts[w], parts[donor][:take]])
            parts[donor] = parts[donor][take:]
    return parts
