"""prepare: raw archive in data/ -> safe extraction -> normalised table with a seeded split."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.config import RecipeConfig
from coursepipe.data.archive import extract
from coursepipe.io import atomic_path
from coursepipe.paths import Paths
from coursepipe.recipes import get_recipe

TABLE = "table.parquet"


@dataclass
class PrepareResult:
    rows: int
    valid_rows: int
    path: Path


def split_mask(n: int, valid_pct: float, seed: int) -> np.ndarray:
    """Seeded random validation mask: exactly round(n * valid_pct) rows are True."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: int(round(n * valid_pct))]] = True
    return mask


def run(cfg: RecipeConfig, paths: Paths) -> PrepareResult:
    recipe = get_recipe(cfg.name)
    archive = paths.data / cfg.source_file
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} is missing: run `coursepipe fetch {cfg.name}` first")
    with tempfile.TemporaryDirectory(dir=paths.root) as tmp:
        extracted = extract(archive, Path(tmp) / "raw")
        df = recipe.normalise(recipe.read_raw(extracted))
    # A recipe whose data comes pre-split (train.txt / valid.txt) supplies split(df, cfg) -> mask.
    split = getattr(recipe, "split", None)
    df["is_valid"] = (np.asarray(split(df, cfg), dtype=bool) if split is not None
                      else split_mask(len(df), cfg.prepare.valid_pct, cfg.prepare.seed))
    # ... and a recipe that checks across the split (the same image in train and valid) does it here
    after = getattr(recipe, "after_split", None)
    if after is not None:
        df = after(df, cfg)
    out = paths.prepared(cfg.name)
    with atomic_path(out) as tmp_out:
        tmp_out.mkdir()
        df.to_parquet(tmp_out / TABLE, index=False)
    return PrepareResult(rows=len(df), valid_rows=int(df["is_valid"].sum()), path=out / TABLE)


def load(paths: Paths, recipe: str) -> pd.DataFrame:
    path = paths.prepared(recipe) / TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    return pd.read_parquet(path)
