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


def read_raw(extracted: Path, p: imdb.CorpusPrepare) -> pd.DataFrame:
    return imdb.read_corpus(extracted, p, ("train", "unsup"), "imdb_lm")


RECIPE = Recipe(
    name="imdb_lm",
    kind=LanguageModel(),
    schema=Schema(columns=imdb.CORPUS_COLUMNS, target="text", categories={"part": ("train", "unsup")}),
    model_config=AWDLSTMModel,
    synthesize=imdb.synthesize,
    read_raw=read_raw,
    normalise=imdb.normalise_corpus,
    expectations=imdb.corpus_expectations,
    prepare_config=imdb.CorpusPrepare,
)
