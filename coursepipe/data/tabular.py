"""Tabular preprocessing fitted on the training split: FillMissing, Categorify, Normalize (fastai)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from coursepipe.export.portable_tabular import NA, _as_str, preprocess


def fit_processor(train: pd.DataFrame, cat_names, cont_names, target: str, classes) -> dict:
    """Statistics from the training rows only, as a JSON-able dict (it travels into the export)."""
    categories, medians, means, stds, na_names = {}, {}, {}, {}, []
    for col in cat_names:
        seen = sorted(v for v in _as_str(train[col]).dropna().unique())
        categories[col] = [NA, *seen]
    for col in cont_names:
        x = pd.to_numeric(train[col], errors="coerce").astype("float64")
        if x.isna().any():
            na_names.append(col)
            categories[f"{col}_na"] = [NA, "False", "True"]
        medians[col] = float(x.median())
        filled = x.fillna(medians[col])
        means[col] = float(filled.mean())
        stds[col] = float(filled.std(ddof=0)) or 1.0  # a constant column must not divide by 0
    return {"kind": "tabular_classification", "target": target, "classes": list(classes),
            "cat_names": list(cat_names), "cont_names": list(cont_names), "na_names": na_names,
            "categories": categories, "medians": medians, "means": means, "stds": stds}


def encode_target(state: dict, y: pd.Series) -> np.ndarray:
    index = {c: i for i, c in enumerate(state["classes"])}
    bad = sorted(set(y.dropna().astype(str)) - set(index))
    if bad or y.isna().any():
        raise ValueError(f"target {state['target']!r} has values outside {state['classes']}: "
                         f"{bad[:5] or ['<missing>']}")
    return y.astype(str).map(index).to_numpy(np.int64).copy()


def to_tensors(state: dict, df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cats, conts, y) for the rows of `df`."""
    cats, conts = preprocess(state, df)
    y = encode_target(state, df[state["target"]])
    return torch.from_numpy(cats.copy()), torch.from_numpy(conts.copy()), torch.from_numpy(y)


def cardinalities(state: dict) -> list[int]:
    names = list(state["cat_names"]) + [f"{c}_na" for c in state["na_names"]]
    return [len(state["categories"][n]) for n in names]
