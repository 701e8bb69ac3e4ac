"""prepare: raw archive (data/<recipe>/<source>.<tgz|zip>) -> prepared/<recipe>/table.parquet.

Extracts safely, reads the recipe's layout, types it, and lets the recipe's kind split it (and
apply its policies: bad images, unseen ids). Beside the table, source.json records where it came
from (source, archive, its md5, the prepare section), which the export's model card quotes.
Reads params: source, sources, prepare.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from coursepipe.config import RecipeConfig
from coursepipe.contract import Recipe
from coursepipe.data.archive import extract
from coursepipe.io import atomic_path, file_digest
from coursepipe.paths import Paths

TABLE = "table.parquet"
LINEAGE = "source.json"
# Rows per parquet row group: the unit Ray Data's read tasks split a table by. One group of a
# 20k-image table would be one 400 MB block in one task; 1,024 rows of 224-px JPEGs are ~20 MB.
ROW_GROUP_ROWS = 1024


@dataclass
class PrepareResult:
    rows: int
    valid_rows: int
    path: Path


def run(cfg: RecipeConfig, recipe: Recipe, paths: Paths) -> PrepareResult:
    archive = paths.data / cfg.source_file
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} is missing: run `coursepipe fetch {cfg.name}` first")
    p = cfg.prepare
    with tempfile.TemporaryDirectory(dir=paths.root) as tmp:
        extracted = extract(archive, Path(tmp) / "raw")
        df = recipe.normalise(recipe.read_raw(extracted, p))
    df = recipe.kind.prepare(recipe, df, p)
    lineage = {"source": cfg.source, "archive": cfg.source_file, "archive_md5": file_digest(archive, "md5"),  # as data.dvc lists it
               "prepare": dataclasses.asdict(p)}
    out = paths.prepared(cfg.name)
    with atomic_path(out) as tmp_out:
        tmp_out.mkdir()
        df.to_parquet(tmp_out / TABLE, index=False, row_group_size=ROW_GROUP_ROWS)
        (tmp_out / LINEAGE).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
    return PrepareResult(rows=len(df), valid_rows=int(df["is_valid"].sum()), path=out / TABLE)


def load(paths: Paths, recipe: str, without: tuple[str, ...] = (), valid: bool | None = None) -> pd.DataFrame:
    """The prepared table; `without` leaves columns unread (the bytes only Ray Data's tasks decode),
    `valid` reads only the validation (True) or training (False) rows."""
    path = paths.prepared(recipe) / TABLE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first")
    columns = None
    if without:
        import pyarrow.parquet as pq
        columns = [c for c in pq.read_schema(path).names if c not in without]
    return pd.read_parquet(path, columns=columns,
                           filters=None if valid is None else [("is_valid", "==", valid)])


def lineage(paths: Paths, recipe: str) -> dict:
    """What prepare recorded about the table's origin ({} for a table prepared before it did)."""
    path = paths.prepared(recipe) / LINEAGE
    return json.loads(path.read_text()) if path.is_file() else {}
