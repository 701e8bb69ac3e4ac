"""imdb_pretrain (lessons 3-4, ULMFiT step 1): an AWD-LSTM language model pretrained on a general corpus.

The course starts from WikiText-103 weights: `model.weights` takes fastai's `wt103-fwd.tgz` (a URL
with its sha256, or a local copy) and the corpus then trains on from there. Offline (`none`, the
default) it pretrains on the configured corpus alone: the unlabelled reviews (`imdb/unsup/`) of an
aclImdb-layout archive, or every training text of a `label,text,is_valid` CSV; texts that are also
texts of the classifier's evaluation split (`test/`, `is_valid`) are dropped (prepare logs how
many). Its model is where imdb_lm (fine-tuning, `starts_from: models/imdb_pretrain`) starts. Shares
its readers with imdb_lm and imdb (coursepipe/text/imdb.py).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.kinds.language_model import LanguageModel, PretrainedAWDLSTM
from coursepipe.text import imdb


def read_raw(extracted: Path, p: imdb.CorpusPrepare) -> pd.DataFrame:
    """The general corpus: no labelled review, no evaluation text."""
    return imdb.read_corpus(extracted, p, ("unsup",), "imdb_pretrain")


RECIPE = Recipe(
    name="imdb_pretrain",
    kind=LanguageModel(),
    schema=Schema(columns=imdb.CORPUS_COLUMNS, target="text", categories={"part": ("unsup", "train")}),
    model_config=PretrainedAWDLSTM,
    synthesize=imdb.synthesize,
    read_raw=read_raw,
    normalise=imdb.normalise_corpus,
    expectations=imdb.corpus_expectations,
    prepare_config=imdb.CorpusPrepare,
)
