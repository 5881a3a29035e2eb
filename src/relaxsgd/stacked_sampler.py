"""The next training batch of many workers' samplers at once, on the bank's device.

Contract: :meth:`StackedSamplers.indices` ``(rows)`` returns exactly
``torch.stack([samplers[k].next(batch) for k in rows])`` and leaves every sampler in
exactly the state those calls would (permutation, position, passes, generator), so that
checkpoints, resumed runs and the distributed runtime (one sampler at a time) see the
same indices. The :class:`~relaxsgd.training.Sampler` objects stay the state of record.

How it is fast at many workers (1,024 logistic-regression workers on shards of one batch
end a pass every other step): the samplers' permutations are stacked (padded to the
longest shard) on the device, so that all rows' batches are one gather; a row whose pass
ends mid-batch takes the tail of its old permutation and the head of its new one in the
same gather. Each new permutation is still drawn by its own generator (``randperm`` on
each worker's stream: the numbers cannot be batched without changing the streams), but
mapping the draws through the shards and storing them is one call for all the rows that
reach a new pass. A shard shorter than a batch (several passes in one batch) takes the
sampler's own path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .devices import draw
from .training import Sampler


class StackedSamplers:
    """Batches of ``batch`` indices from ``samplers`` (one per bank row), on ``device``."""

    def __init__(self, samplers: Sequence[Sampler], batch: int,
                 device: torch.device) -> None:
        self.samplers, self.batch, self.device = list(samplers), batch, device
        rows = len(self.samplers)
        self.lengths = [s.shard.numel() for s in self.samplers]
        longest = max(self.lengths, default=0)
        # the shards stacked where they live (the host), padded, to map new draws at once
        where = self.samplers[0].shard.device if self.samplers else device
        dtype = self.samplers[0].shard.dtype if self.samplers else torch.int64
        self.shards = torch.zeros(rows, longest, dtype=dtype, device=where)
        for k, s in enumerate(self.samplers):
            self.shards[k, :s.shard.numel()] = s.shard
        self.perms = torch.zeros(rows, longest, dtype=dtype, device=device)
        self.seen: list[Tensor | None] = [None] * rows  # the perm each row of perms holds
        self.cols = torch.arange(batch, device=device)

    def _sync(self, k: int) -> None:
        """Row k of ``perms`` := sampler k's permutation (a new pass taken by the sampler's
        own path, or a restored checkpoint)."""
        s = self.samplers[k]
        if s.perm is not self.seen[k]:
            self.perms[k, :s.perm.numel()] = s.perm
            self.seen[k] = s.perm

    def indices(self, rows: Sequence[int]) -> Tensor:
        """The next batch of each row's sampler, ``(len(rows), batch)`` (module doc)."""
        b = self.batch
        starts, tails, ends, slow = [], [], [], []
        for j, k in enumerate(rows):
            self._sync(k)
            s = self.samplers[k]
            left = s.perm.numel() - s.pos
            starts.append(s.pos)
            if b <= left:
                tails.append(b)
                s.pos += b
            elif self.lengths[k] >= b - left:  # the old tail, then the new pass's head
                tails.append(left)
                ends.append(j)
            else:  # several passes in one batch: the sampler's own path, below
                tails.append(b)
                slow.append(j)
        dev = self.device
        at_rows = torch.tensor(list(rows), device=dev).unsqueeze(1)
        start = torch.tensor(starts, device=dev).unsqueeze(1)
        tail = torch.tensor(tails, device=dev).unsqueeze(1)
        # columns past a row's tail read its new permutation's head (after _new_passes)
        old = self.perms[at_rows, (start + self.cols).clamp(max=self.perms.shape[1] - 1)]
        if ends:
            self._new_passes([rows[j] for j in ends], [b - tails[j] for j in ends])
        new = self.perms[at_rows, (self.cols - tail).clamp(min=0)]
        idx = torch.where(self.cols < tail, old, new)
        for j in slow:
            idx[j] = self.samplers[rows[j]].next(b)
        return idx

    def _new_passes(self, ks: list[int], heads: list[int]) -> None:
        """Rows ``ks`` start a new pass, each taking ``heads[i]`` samples of it: their
        generators draw the permutations (in row order, one draw each, as Sampler.next
        does), mapped through the shards in one gather and stored in one write."""
        raw = [draw(torch.randperm, self.lengths[k], generator=self.samplers[k].gen,
                    device=self.shards.device) for k in ks]
        at = torch.tensor(ks, device=self.shards.device)
        perms = self.shards[at.unsqueeze(1), pad_sequence(raw, batch_first=True)]
        self.perms[at.to(self.device), :perms.shape[1]] = perms.to(self.device)
        for i, k in enumerate(ks):
            s = self.samplers[k]
            s.perm, s.pos = perms[i, :self.lengths[k]], heads[i]
            s.passes += 1
            self.seen[k] = s.perm
