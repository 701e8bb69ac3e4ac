"""imdb_pretrain (lessons 3-4, ULMFiT step 1): an AWD-LSTM language model pretrained on a general corpus.

The course starts from WikiText-103 weights: `model.weights` takes fastai's `wt103-fwd.tgz` (a URL
with its sha256, or a local copy) and the corpus then trains on from there. Offline (`none`, the
default) it pretrains on the configured corpus alone: the unlabelled reviews (`imdb/unsup/`) of an aclImdb-layout archive, or every
training text of a `label,text,is_valid` CSV; texts that are also texts of the classifier's
evaluation split (`test/`, `is_valid`) are dropped (prepare logs how many). Its model is where
imdb_lm (fine-tuning, `starts_from: models/imdb_pretrain`) starts. Shares its readers with imdb_lm
and imdb (coursepipe/text/imdb.py).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.kinds.language_model import LanguageModel, PretrainedAWDLSTM
from coursepipe.text import imdb

COLUMNS = ("text", "part")
PARTS = ("unsup",)   # the general corpus: no labelled review, no evaluation text


def read_raw(extracted: Path, p: imdb.CorpusPrepare) -> pd.DataFrame:
    df = imdb.read_any(extracted)
    parts = PARTS if (df["part"] == "unsup").any() else ("train",)  # a CSV has no unsup texts
    corpus, dropped = imdb.lm_corpus(df, parts, p.max_texts, p.seed)
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
    model_config=PretrainedAWDLSTM,
    synthesize=imdb.synthesize,
    read_raw=read_raw,
    normalise=normalise,
    expectations=expectations,
    prepare_config=imdb.CorpusPrepare,
)
