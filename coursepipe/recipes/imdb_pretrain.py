"""imdb_pretrain (lessons 3-4, ULMFiT step 1): an AWD-LSTM language model pretrained on a general corpus.

The course starts from WikiText-103 weights; offline this recipe pretrains on the configured
corpus instead: the unlabelled reviews (`imdb/unsup/`) of an aclImdb-layout archive, or every
training text of a `label,text,is_valid` CSV; texts that are also texts of the classifier's
evaluation split (`test/`, `is_valid`) are dropped (prepare logs how many). Its model is where
imdb_lm (fine-tuning, `starts_from: models/imdb_pretrain`) starts. Shares its readers with imdb_lm
and imdb (coursepipe/text/imdb.py).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.kinds.language_model import AWDLSTMModel, LanguageModel
from coursepipe.text import imdb

COLUMNS = ("text", "part")
PARTS = ("unsup",)   # the general corpus: no labelled review, no evaluation text


def read_raw(extracted: Path, p=None) -> pd.DataFrame:
    df = imdb.read_any(extracted)
    parts = PARTS if (df["part"] == "unsup").any() else ("train",)  # a CSV has no unsup texts
    corpus, dropped = imdb.lm_corpus(df, parts)
    print(f"imdb_pretrain: {len(corpus)} texts of {parts}; {dropped} dropped (also evaluation texts)")
    return corpus


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"text": df["text"].astype(str), "part": df["part"].astype(str)})


def expectations(v) -> list:
    return [("expect_column_value_lengths_to_be_between", {"column": "text", "min_value": 1})]


RECIPE = Recipe(
    name="imdb_pretrain",
    kind=LanguageModel(),
    schema=Schema(columns=COLUMNS, target="text", categories={"part": ("unsup", "train")}),
    model_config=AWDLSTMModel,
    synthesize=imdb.synthesize,
    read_raw=read_raw,
    normalise=normalise,
    expectations=expectations,
)
