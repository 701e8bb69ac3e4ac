"""imdb (lessons 3-4, ULMFiT step 3): sentiment of movie reviews with the fine-tuned encoder.

`starts_from: models/imdb_lm`; gradual unfreezing with discriminative learning rates (the model
section's `unfreeze`). Layouts: fastai's IMDB_SAMPLE `texts.csv` (its `is_valid` split) or aclImdb
(`test/` is the validation set, unsup/ unused here). Course result: accuracy 0.944 on the full
IMDB test set (WikiText-103 weights, GPU hours).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.kinds.text_classifier import TextClassification, TextClassifierModel
from coursepipe.text import imdb

CLASSES = ("negative", "positive")
COLUMNS = ("label", "text", "part", "file")


def read_raw(extracted: Path, p=None) -> pd.DataFrame:
    df = imdb.read_any(extracted)
    return df[df["part"] != "unsup"].reset_index(drop=True)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({c: df[c].astype(str) for c in COLUMNS})


def split(df: pd.DataFrame, p=None) -> np.ndarray:
    """test/ (or is_valid) is the validation set, as in the course."""
    return (df["part"] == "test").to_numpy()


RECIPE = Recipe(
    name="imdb",
    course=("accuracy", 0.944, "lesson 3/4 ULMFiT, full IMDB, WikiText-103 start"),
    kind=TextClassification(),
    schema=Schema(columns=(*COLUMNS, "duplicate"), target="label", classes=CLASSES,
                  categories={"part": ("train", "test")}),
    model_config=TextClassifierModel,
    synthesize=imdb.synthesize,
    read_raw=read_raw,
    normalise=normalise,
    split=split,
)
