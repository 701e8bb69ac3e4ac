"""Text classification batches: token ids of each text, right-padded, in batches of similar lengths.

As fastai's SortishSampler: training rows are shuffled, cut into chunks of `bs * chunk` rows, each
chunk sorted by length and cut into batches, and the batches shuffled; all from a generator seeded
by (seed, epoch), identical on every rank, so a resumed epoch replays exactly and every rank takes
the same number of steps (rank r reads batches r, r + world, ...). Validation batches are sorted by
length (no padding wasted) and dealt out the same way; metric sums are added over ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from coursepipe.export import portable_lm
from coursepipe.export.portable_lm import PAD
from coursepipe.text.tokenizer import encode  # noqa: F401  (the classifier's public API)


def pad_right(seqs: list[np.ndarray], pad_id: int) -> torch.Tensor:
    """(B, longest) int64, each row its ids then pad_id (the exported predictor's padding)."""
    return torch.from_numpy(portable_lm.pad_right(seqs, pad_id))


SORTISH_CHUNK = 50  # batches per sorted chunk (fastai's SortishSampler sorts bs * 50 rows at a time)


def sortish_batches(lengths: np.ndarray, bs: int, rng: np.random.Generator, chunk: int) -> list[np.ndarray]:
    """Row indices of whole batches (bs rows; a partial one is dropped, fastai's drop_last) of
    similar lengths, in a random order."""
    idx = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(idx), bs * chunk):
        part = idx[start:start + bs * chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + bs] for i in range(0, len(part), bs)]
    return [batches[i] for i in rng.permutation(len(batches)) if len(batches[i]) == bs]


def longest_first(lengths: np.ndarray, bs: int) -> list[np.ndarray]:
    """Row indices of batches of every row, longest first (scoring: no padding wasted)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + bs] for i in range(0, len(order), bs)]


class TextBatches:
    """callable(epoch) -> this rank's (x, y) batches; x right-padded ids, y class indices."""

    def __init__(self, ids: list[np.ndarray], y: torch.Tensor, pad_id: int, bs: int, rank: int,
                 world: int, seed: int, train: bool, chunk: int = SORTISH_CHUNK):
        self.ids, self.y, self.pad_id = ids, y, pad_id
        self.lengths = np.array([len(s) for s in ids])
        self.bs, self.rank, self.world, self.seed, self.train, self.chunk = \
            bs, rank, world, seed, train, chunk
        if train and bs % world:
            raise ValueError(f"batch size {bs} does not split over {world} ranks")

    def plan(self, epoch: int) -> list[np.ndarray]:
        if not self.train:
            return longest_first(self.lengths, self.bs)[self.rank::self.world]
        # global batches of bs rows, each rank taking its bs / world slice: DDP averages the same
        # number of steps on every rank
        batches = sortish_batches(self.lengths, self.bs, np.random.default_rng([self.seed, epoch]),
                                  self.chunk)
        local = self.bs // self.world
        return [b[self.rank * local:(self.rank + 1) * local] for b in batches]

    def __len__(self) -> int:
        return len(self.plan(0))

    def __call__(self, epoch: int = 0):
        for b in self.plan(epoch):
            yield pad_right([self.ids[i] for i in b], self.pad_id), self.y[b]


def chunk_batches(ids, y: np.ndarray, pad_id: int, bs: int,
                  rng: np.random.Generator | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The streaming path's batches of one chunk of rows a rank pulled from Ray Data (ids: each
    row's id array). Training (rng): sortish_batches over the chunk, a last partial batch dropped
    (a chunk holds whole batches except an epoch's last). Validation (None): longest first, all."""
    lengths = np.array([len(s) for s in ids])
    plan = (longest_first(lengths, bs) if rng is None else
            sortish_batches(lengths, bs, rng, chunk=-(-len(ids) // bs)))  # the pull: one sorted chunk
    return [(pad_right([ids[i] for i in b], pad_id), torch.as_tensor(y[b])) for b in plan]


def pad_id(itos: list[str]) -> int:
    return itos.index(PAD)
