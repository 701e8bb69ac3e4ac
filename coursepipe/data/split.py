"""Seeded validation splits and row orders (shared by the kinds' prepare)."""
from __future__ import annotations

import numpy as np


def split_mask(n: int, valid_pct: float, seed: int) -> np.ndarray:
    """Seeded random validation mask: exactly round(n * valid_pct) rows are True."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(n * valid_pct))]] = True
    return mask


def seeded_order(df, seed: int):
    """Rows in a seeded random order. Layouts list files class by class; the streaming data path
    reads the table row group by row group through a small local shuffle buffer, so a
    class-sorted table would give it batches of one or two classes."""
    return df.iloc[np.random.default_rng(seed).permutation(len(df))].reset_index(drop=True)
