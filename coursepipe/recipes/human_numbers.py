"""human_numbers (lesson 7): an RNN language model over the numbers 1-9,999 written in words.

Layout (fastai URLs.HUMAN_NUMBERS): human_numbers/train.txt (one to eight thousand) and
human_numbers/valid.txt (eight thousand one to nine thousand nine hundred ninety nine), one
number a line with a trailing space ("eight thousand one \n"). The dataset is fully determined,
so the archive this project generates IS the real dataset, not a sample. As in the lesson, each
file becomes one document, its lines joined by " , " and tokenised with a leading xxbos.
Course result: next-token accuracy 0.807 (2-layer GRU); fastai 2.8.12 reaches 0.82 here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.data.archive import deterministic_tgz
from coursepipe.kinds.language_model import LanguageModel, LMModel

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


def read_raw(extracted: Path, p=None) -> pd.DataFrame:
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


def split(df: pd.DataFrame, p=None) -> np.ndarray:
    """valid.txt is the validation set (the course's split), not a random sample."""
    return (df["file"] == "valid").to_numpy()


def expectations(v) -> list:
    """Row counts 8000 / 1999, every number once (the schema's pattern: only number words)."""
    by_file = [("expect_column_values_to_be_between",
                {"column": "number", "min_value": lo, "max_value": hi,
                 "row_condition": f'file=="{f}"', "condition_parser": "pandas"})
               for f, lo, hi in (("train", 1, TRAIN_LAST), ("valid", TRAIN_LAST + 1, LAST))]
    return [("expect_table_row_count_to_equal", {"value": LAST}),
            ("expect_column_values_to_be_unique", {"column": "number"}),
            *by_file]


# ----------------------------------------------------------------------------- the recipe

RECIPE = Recipe(
    name="human_numbers",
    course=("accuracy", 0.807, "lesson 7, 2-layer GRU"),
    kind=LanguageModel(),
    schema=Schema(columns=COLUMNS, target=TARGET, categories=CATEGORIES, ranges=RANGES,
                  patterns={"text": WORDS_REGEX}),
    model_config=LMModel,
    synthesize=synthesize,
    read_raw=read_raw,
    normalise=normalise,
    split=split,
    expectations=expectations,
)
