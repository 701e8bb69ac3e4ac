"""Per-rank batches of in-memory tensors: every rank its own shard, same step count on all."""
from __future__ import annotations

import torch


def shard_batches(n: int, bs: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool,
                  drop_last: bool):
    """Row indices of this rank's batches. Every rank gets the same number of batches, so DDP's
    all-reduces line up; the permutation depends only on (seed, epoch), so a resumed epoch
    replays exactly."""
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    per_rank = n // world if drop_last else -(-n // world)
    mine = order[rank::world][:per_rank]
    local_bs = max(1, bs // world) if drop_last else bs
    n_batches = len(mine) // local_bs if drop_last else -(-len(mine) // local_bs)
    return [mine[i * local_bs:(i + 1) * local_bs] for i in range(n_batches)]


class TensorBatches:
    """Batches of in-memory tensors for one rank: slicing, no per-row collation."""

    def __init__(self, tensors, bs: int, rank: int, world: int, seed: int, train: bool):
        self.tensors, self.bs, self.rank, self.world = tensors, bs, rank, world
        self.seed, self.train = seed, train

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same for every epoch)."""
        return len(shard_batches(len(self.tensors[0]), self.bs, self.rank, self.world, self.seed, 0,
                                 shuffle=False, drop_last=self.train))

    def __call__(self, epoch: int = 0):
        n = len(self.tensors[0])
        for idx in shard_batches(n, self.bs, self.rank, self.world, self.seed, epoch,
                                 shuffle=self.train, drop_last=self.train):
            yield tuple(t[idx] for t in self.tensors)
