"""human_numbers (lesson 7): an RNN language model over the numbers 1-9,999 written in words.

Layout (fastai URLs.HUMAN_NUMBERS): human_numbers/train.txt (one to eight thousand) and
human_numbers/valid.txt (eight thousand one to nine thousand nine hundred ninety nine), one
number a line with a trailing space ("eight thousand one \n"). The dataset is fully determined,
so the archive this project generates IS the real dataset, not a sample. As in the lesson, each
file becomes one document, its lines joined by " , " and tokenised with a leading xxbos.
Course result: next-token accuracy 0.807 (2-layer GRU); fastai 2.8.12 reaches 0.82 here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.data.archive import deterministic_tgz

KIND = "language_model"
PORTABLE = "coursepipe.export.portable_lm"
FILES = {"train": "human_numbers/train.txt", "valid": "human_numbers/valid.txt"}
TRAIN_LAST, LAST = 8_000, 9_999   # train.txt holds 1..8000, valid.txt 8001..9999

ONES = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
WORDS = tuple(w for w in ONES + TENS if w) + ("hundred", "thousand")
WORDS_REGEX = rf"^(?:{'|'.join(WORDS)})(?: (?:{'|'.join(WORDS)}))*$"  # words, single spaces

# validation schema (coursepipe/validation/suites.py): the table normalise() returns
TARGET = "text"                   # a language model's target is its own text, one token ahead
COLUMNS = ("text", "number", "file")
CATEGORIES = {"file": ("train", "valid")}
RANGES = {"number": (1, LAST)}


@dataclass(frozen=True)
class ModelConfig:
    """The lesson's models (arch) and the language-model data they read."""
    arch: str = "gru"          # rnn3 | rnn_loop | rnn_seq | rnn_stateful | nn_rnn | gru
    nh: int = 64               # hidden size
    n_layers: int = 2          # GRU layers (nn_rnn uses 1, as in the lesson)
    seq_len: int = 16          # bptt: tokens per batch (rnn3 always reads 3)
    valid_bs: int = 64         # validation streams; the lesson validates with the training bs
    bptt_jitter: bool = False  # fastai v1's random batch lengths (train only)
    p_half: float = 0.05       # jitter: chance a batch is centred on seq_len / 2
    jitter_std: float = 5.0    # jitter: normal spread of the length, tokens
    min_len: int = 5           # jitter: shortest batch, tokens
    sep: str = ","             # token between numbers (the course notebook's ', ' join)
    min_freq: int = 3          # vocabulary: rarer words become xxunk
    max_vocab: int = 60_000

    def __post_init__(self):
        from coursepipe.config import ConfigError
        from coursepipe.models.rnn import ARCHS
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: {self.arch!r} is not one of {list(ARCHS)}")
        for name in ("nh", "n_layers", "seq_len", "valid_bs", "min_len", "min_freq", "max_vocab"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.arch == "rnn3" and self.seq_len != 3:
            raise ConfigError(f"seq_len must be 3 for arch rnn3 (three tokens in), got {self.seq_len}")


# ----------------------------------------------------------------------------- the dataset

def number_words(n: int) -> str:
    """1..9999 in words as fastai's files spell them: 'nine thousand nine hundred ninety nine'."""
    if not 1 <= n <= LAST:
        raise ValueError(f"{n} is outside 1..{LAST}")
    thousands, rest = divmod(n, 1000)
    hundreds, rest = divmod(rest, 100)
    parts = [ONES[thousands], "thousand"] if thousands else []
    parts += [ONES[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        parts += [TENS[rest // 10]] + ([ONES[rest % 10]] if rest % 10 else [])
    elif rest:
        parts.append(ONES[rest])
    return " ".join(parts)


def parse_number(text: str) -> float:
    """The inverse of number_words; NaN for anything it would not have written."""
    value = {w: i for i, w in enumerate(ONES) if w} | {w: 10 * i for i, w in enumerate(TENS) if w}
    words = str(text).split()
    total, part = 0, 0
    for w in words:
        if w == "thousand":
            total, part = total + part * 1000, 0
        elif w == "hundred":
            part *= 100
        elif w in value:
            part += value[w]
        else:
            return float("nan")
    n = total + part
    return float(n) if words and 1 <= n <= LAST and number_words(n) == " ".join(words) else float("nan")


def synthesize(rows: int | None = None, seed: int = 0) -> bytes:
    """fastai's human_numbers archive, generated: it is the real dataset (fully determined)."""
    if rows not in (None, LAST):
        raise ValueError(f"human_numbers is the fixed set 1..{LAST}; rows must be unset, got {rows}")
    lines = {"train": range(1, TRAIN_LAST + 1), "valid": range(TRAIN_LAST + 1, LAST + 1)}
    return deterministic_tgz({FILES[k]: "".join(f"{number_words(n)} \n" for n in r).encode()
                              for k, r in lines.items()})


def read_raw(extracted: Path) -> pd.DataFrame:
    """One row per line of train.txt then valid.txt: text (as written) and file."""
    frames = []
    for file, member in FILES.items():
        path = extracted / member
        if not path.is_file():
            found = sorted(str(p.relative_to(extracted)) for p in extracted.rglob("*.txt"))[:5]
            raise FileNotFoundError(f"archive has no {member} (txt files found: {found or 'none'})")
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":  # the newline that ends the last line
            lines.pop()
        frames.append(pd.DataFrame({"text": lines, "file": file}))
    return pd.concat(frames, ignore_index=True)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """text stripped (fastai's trailing space), number parsed from it (NaN if not a number)."""
    out = pd.DataFrame({"text": df["text"].astype(str).str.strip()})
    out["number"] = out["text"].map(parse_number).astype("float64")
    out["file"] = df["file"].astype(str)
    return out[list(COLUMNS)]


def split(df: pd.DataFrame, cfg) -> np.ndarray:
    """valid.txt is the validation set (the course's split), not a random sample."""
    return (df["file"] == "valid").to_numpy()


def extra_expectations(v) -> list:
    """Row counts 8000 / 1999, every number once, only number words."""
    by_file = [("expect_column_values_to_be_between",
                {"column": "number", "min_value": lo, "max_value": hi,
                 "row_condition": f'file=="{f}"', "condition_parser": "pandas"})
               for f, lo, hi in (("train", 1, TRAIN_LAST), ("valid", TRAIN_LAST + 1, LAST))]
    return [("expect_table_row_count_to_equal", {"value": LAST}),
            ("expect_column_values_to_match_regex", {"column": "text", "regex": WORDS_REGEX}),
            ("expect_column_values_to_be_unique", {"column": "number"}),
            *by_file]


# ----------------------------------------------------------------------------- learner parts

def fit_processor(train: pd.DataFrame, model: ModelConfig) -> dict:
    """The vocabulary of the training document, and what the export needs to rebuild windows."""
    from coursepipe.models.rnn import LAST_STEP
    from coursepipe.text.tokenizer import document, make_vocab, tokenize

    itos = make_vocab(tokenize(document(train[TARGET], model.sep)), model.min_freq, model.max_vocab)
    return {"itos": itos, "sep": model.sep, "text_column": TARGET,
            "seq_len": 3 if model.arch == "rnn3" else model.seq_len,
            "arch": model.arch, "last_step": model.arch in LAST_STEP}


def tensors(processor: dict, df: pd.DataFrame):
    """(x, y): consecutive windows of the rows' token stream, each (N, seq_len) int64."""
    import torch
    from coursepipe.text.tokenizer import stream, windows

    x, y = windows(stream(processor, df[TARGET]), processor["seq_len"])
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def batches(recipe, processor: dict, df: pd.DataFrame, bs: int, rank: int, world: int, seed: int,
            train: bool, cfg=None):
    """Contiguous LM streams: each rank reads its own slice of the stream (not interleaved rows)."""
    import torch
    from coursepipe.text.lm_data import Jitter, LMBatches
    from coursepipe.text.tokenizer import stream

    m: ModelConfig = cfg.model
    ids = torch.from_numpy(stream(processor, df[TARGET]))
    # jitter only where the model reads any length (not the fixed-window rnn3 / rnn_loop)
    jitter = Jitter(m.p_half, m.jitter_std, m.min_len) \
        if train and m.bptt_jitter and not processor["last_step"] else None
    # the loop hands validation bs * 4; the lesson validates stateful streams at the training bs
    return LMBatches(ids, bs if train else m.valid_bs, processor["seq_len"], rank, world, seed,
                     jitter=jitter, full_only=processor["last_step"])


def build_model(processor: dict, model: ModelConfig):
    from coursepipe.models.rnn import build
    return build(model.arch, len(processor["itos"]), model.nh, model.n_layers)


def splitter(model):
    return [list(model.parameters())]


def loss_func():
    from coursepipe.models.rnn import lm_loss
    return lm_loss


def metrics() -> dict:
    from coursepipe.models.rnn import lm_accuracy
    return {"accuracy": lm_accuracy}


def callbacks(cfg) -> list:
    """Stateful models: carry the state across batches, forgotten at each epoch and validation."""
    from coursepipe.models.rnn import STATEFUL
    from coursepipe.text.callbacks import ResetState
    return [ResetState()] if cfg.model.arch in STATEFUL else []


def evaluate(model, recipe, processor: dict, valid: pd.DataFrame, bs: int, plots: Path, cfg):
    """Next-token accuracy, loss, perplexity (stateful streams, as in training) + a PNG."""
    from coursepipe.text.evaluate import evaluate_lm
    return evaluate_lm(model, processor, batches(recipe, processor, valid, bs, 0, 1, 0, False, cfg),
                       tensors(processor, valid), plots, title=f"{cfg.name} ({cfg.model.arch})")
