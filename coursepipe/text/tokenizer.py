"""fastai's tokenizer and vocabulary: special tokens, case/repetition rules, min-frequency vocab.

The rules and numericalisation live in coursepipe/export/portable_lm.py (the standalone predict
module copied into every export), so training and the exported predictor share one definition;
this module adds what only training needs: building the vocabulary from training text.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

from coursepipe.export.portable_lm import (  # noqa: F401  (re-exported: the public text API)
    BOS, EOS, FAKE, FLD, MAJ, PAD, REP, SPECIALS, UNK, UP, WREP, document, fix_html, numericalize,
    replace_all_caps, replace_maj, replace_rep, replace_wrep, rm_useless_spaces, spec_add_spaces,
    stream, text_tokens, tokenize, windows)


def make_vocab(tokens: Iterable[str], min_freq: int = 3, max_vocab: int = 60_000) -> list[str]:
    """itos: fastai's special tokens, then words seen >= min_freq times, most frequent first.

    At most max_vocab words; ties keep first-seen order (deterministic); padded with xxfake to a
    multiple of 8 (fastai does this so the embedding / softmax matrices tile well on GPUs).
    """
    return vocab_of(Counter(tokens), min_freq, max_vocab)


def vocab_of(counts: Counter, min_freq: int = 3, max_vocab: int = 60_000) -> list[str]:
    """make_vocab from token counts already made (a Counter keeps first-seen order, so counting
    text by text gives the same itos as counting one list of every token)."""
    if min_freq < 1 or max_vocab < 1:
        raise ValueError(f"min_freq and max_vocab must be >= 1, got {min_freq}, {max_vocab}")
    words = [w for w, c in counts.most_common() if c >= min_freq and w not in SPECIALS][:max_vocab]
    itos = [*SPECIALS, *words]
    return itos + [FAKE] * (-len(itos) % 8)


def encode(itos: list[str], texts) -> list[np.ndarray]:
    """Each text's ids (xxbos first), as the exported predictor computes them."""
    return [numericalize(tokenize(str(t)), itos) for t in texts]


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of per-row arrays: a column Ray Data keeps ragged (one id array per text)."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
