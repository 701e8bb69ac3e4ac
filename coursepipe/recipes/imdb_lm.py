"""imdb_lm (lessons 3-4, ULMFiT step 2): the pretrained language model fine-tuned on IMDB's texts.

`starts_from: models/imdb_pretrain`: the pretrained AWD-LSTM, its embedding matched to this
corpus' vocabulary. The corpus is every review the classifier does not evaluate on: train/ and
unsup/ of aclImdb (test/ texts dropped, also where they recur in train/ or unsup/), or the
training rows of a `label,text,is_valid` CSV. The classifier (imdb) starts from this model.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.kinds.language_model import AWDLSTMModel, LanguageModel
from coursepipe.text import imdb

COLUMNS = ("text", "part")


def read_raw(extracted: Path, p: imdb.CorpusPrepare) -> pd.DataFrame:
    corpus, dropped = imdb.lm_corpus(imdb.read_any(extracted), ("train", "unsup"), p.max_texts, p.seed)
    print(f"imdb_lm: {len(corpus)} texts; {dropped} dropped (also evaluation texts)")
    return corpus


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"text": df["text"].astype(str), "part": df["part"].astype(str)})


def expectations(v) -> list:
    return [("expect_column_value_lengths_to_be_between", {"column": "text", "min_value": 1})]


RECIPE = Recipe(
    name="imdb_lm",
    kind=LanguageModel(),
    schema=Schema(columns=COLUMNS, target="text", categories={"part": ("train", "unsup")}),
    model_config=AWDLSTMModel,
    synthesize=imdb.synthesize,
    read_raw=read_raw,
    normalise=normalise,
    expectations=expectations,
    prepare_config=imdb.CorpusPrepare,
)
