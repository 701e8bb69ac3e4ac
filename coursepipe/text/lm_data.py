"""Language-model batches: one token stream cut into bs contiguous rows, read bptt tokens at a time.

As fastai's LMDataLoader: row i of the batch continues row i of the previous batch, so a stateful
RNN can carry its hidden state across batches. As fastai v1's LanguageModelPreLoader, training
batches vary their length: bptt, halved with probability p_half, plus N(0, jitter_std), at least
min_len. Lengths are drawn from a generator seeded by (seed, epoch), identical on every rank, so
all ranks take the same number of steps and a resumed epoch replays exactly.
Under data parallelism each rank reads its own contiguous block of rows (rank r: rows
[r*bs/world, (r+1)*bs/world)), i.e. its own contiguous slice of the stream.

The streaming path (`train.data_path: ray_data`, `lane_batches`) cannot cut a training stream it
never holds whole: a rank's rows are filled with whole texts as Ray Data hands them over, each
row taking the next text when it has fewer tokens left than the next batch reads. A row is still
one contiguous run of whole texts, so the state a stateful RNN carries is as meaningful as above.
Scoring keeps LMBatches' layout (rank 0 holds the validation split's ids, 8 bytes a token), so
the validation metrics are the memory path's and the evaluate stage's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch


@dataclass(frozen=True)
class Jitter:
    """fastai v1's random bptt: most batches near bptt, a few near bptt / 2."""
    p_half: float = 0.05
    std: float = 5.0
    min_len: int = 5


def seq_lengths(n_cols: int, bptt: int, jitter: Jitter | None, seed: int, epoch: int) -> list[int]:
    """Batch lengths (tokens) that cover n_cols positions of every row."""
    rng = np.random.default_rng([seed, epoch])
    out, pos = [], 0
    while pos < n_cols:
        n = bptt
        if jitter is not None:
            base = bptt / 2 if rng.random() < jitter.p_half else bptt
            n = max(jitter.min_len, int(rng.normal(base, jitter.std)))
        n = min(n, n_cols - pos)
        out.append(n)
        pos += n
    return out


def rows_of(ids: torch.Tensor, bs: int) -> torch.Tensor:
    """(bs, L + 1): the stream cut into bs contiguous rows that overlap by one token (the target)."""
    L = (len(ids) - 1) // bs
    if L < 1:
        raise ValueError(f"a stream of {len(ids)} tokens is too short for {bs} rows")
    idx = torch.arange(bs)[:, None] * L + torch.arange(L + 1)[None]
    return ids[idx]


class LMBatches:
    """callable(epoch) -> (x, y) batches of this rank's rows: x (b, T) ids, y the next ids.

    full_only: stop at the first batch shorter than bptt (models that read a fixed window)."""

    def __init__(self, ids: torch.Tensor, bs: int, bptt: int, rank: int = 0, world: int = 1,
                 seed: int = 0, jitter: Jitter | None = None, full_only: bool = False):
        if bs % world:
            raise ValueError(f"batch size {bs} does not split over {world} ranks")
        local = bs // world
        self.rows = rows_of(ids, bs)[rank * local:(rank + 1) * local]  # (bs/world, L + 1)
        self.bptt, self.seed, self.jitter, self.full_only = bptt, seed, jitter, full_only

    def __call__(self, epoch: int = 0):
        pos = 0
        for n in seq_lengths(self.rows.shape[1] - 1, self.bptt, self.jitter, self.seed, epoch):
            if self.full_only and n < self.bptt:  # a fixed-window model cannot read a short tail
                break
            yield self.rows[:, pos:pos + n], self.rows[:, pos + 1:pos + n + 1]
            pos += n


# texts a streaming rank pulls from Ray Data per row of its batch at a time (Kind.stream_chunk):
# a pull lasts a few batches (an IMDB review is ~270 tokens, a batch reads 72 of each row)
TEXTS_PER_ROW = 4


def lane_batches(texts: Iterable[np.ndarray], lanes: int,
                 bptt: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Training (x, y) batches of `lanes` rows, bptt tokens each, from texts' id arrays in arrival
    order: before each batch, every row short of bptt + 1 tokens takes the next texts (row 0
    first). Ends at the first batch some row cannot fill, once the texts ran out (each row is
    left with under one text)."""
    texts = iter(texts)
    held: list[list[np.ndarray]] = [[] for _ in range(lanes)]
    have = np.zeros(lanes, dtype=np.int64)
    while True:
        for i in range(lanes):
            while have[i] < bptt + 1:
                ids = next(texts, None)
                if ids is None:
                    return
                held[i].append(np.asarray(ids, dtype=np.int64))
                have[i] += len(ids)
        rows = [np.concatenate(h) if len(h) > 1 else h[0] for h in held]
        x = np.stack([r[:bptt] for r in rows])
        y = np.stack([r[1:bptt + 1] for r in rows])
        held = [[r[bptt:]] for r in rows]  # the next batch starts where this one's x ended
        have -= bptt
        yield torch.from_numpy(x), torch.from_numpy(y)


def lane_steps(tokens: int, bs: int, bptt: int) -> int:
    """Full batches of bptt tokens in each of bs rows that share `tokens` evenly: the streaming
    path's steps per epoch (a rank whose texts run out sooner stops there with every rank)."""
    return max(0, (tokens // bs - 1) // bptt)
