"""Seeded validation splits (shared by every kind's prepare)."""
from __future__ import annotations

import numpy as np


def split_mask(n: int, valid_pct: float, seed: int) -> np.ndarray:
    """Seeded random validation mask: exactly round(n * valid_pct) rows are True."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(n * valid_pct))]] = True
    return mask
