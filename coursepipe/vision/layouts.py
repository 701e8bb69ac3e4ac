"""Image layouts shared by recipes: a CSV of file and label(s) beside a folder of images.

fastai's `from_csv` (lesson 2's own images, lesson 3's planet): rows of <file>,<label> with the
files relative to the CSV's folder, optionally inside `folder` and missing their `suffix`
(planet's `train_v2.csv` names `train_0` for `train-jpg/train_0.jpg`), and an optional true/false
column fixing the split. Every bad row is named (row number and file) before any image is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from coursepipe.data.csvfile import DataError, read_csv

TRUTHY, FALSY = {"true", "1", "yes", "valid"}, {"false", "0", "no", "train", ""}


@dataclass
class CsvListing:
    """What a label CSV lists: files (absolute, inside the archive), their label cells, and the
    fixed split ('train' / 'valid' per row, or '' for every row when the CSV has no such column)."""
    files: list[Path]
    labels: list[str]
    layout_split: np.ndarray


def read_label_csv(extracted: Path, csv_file: str, columns: tuple[str, str], valid_column: str | None,
                   folder: str = "", suffix: str = "", allow_empty: bool = False) -> CsvListing:
    """The rows of `csv_file` (inside the extracted archive) checked: every file inside the archive
    and present, every label cell non-empty (unless `allow_empty`), the valid column true/false."""
    csv_path = (extracted / csv_file).resolve()
    if not csv_path.is_relative_to(extracted.resolve()) or not csv_path.is_file():
        raise FileNotFoundError(f"layout csv: {csv_file} is not a file inside the archive")
    table = read_csv(csv_path, csv_file, dtype=str, keep_default_na=False)
    needed = [*columns, *([valid_column] if valid_column else [])]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise DataError(f"{csv_file}: no column(s) {missing}; it has {list(table.columns)}")
    file_col, label_col = columns
    base, root = (csv_path.parent / folder).resolve(), extracted.resolve()
    files, labels = [], []
    for i, (name, label) in enumerate(zip(table[file_col], table[label_col]), start=1):
        f = (base / f"{name}{suffix}").resolve()
        if not f.is_relative_to(root):  # "../../etc/passwd" in a label file
            raise DataError(f"{csv_file}: row {i}: {name!r} points outside the archive")
        if not f.is_file():
            shown = f.relative_to(root).as_posix()
            where = f" ({shown})" if (folder or suffix) else ""
            raise DataError(f"{csv_file}: row {i}: {name!r}{where} is not a file in the archive")
        if not label.strip() and not allow_empty:
            raise DataError(f"{csv_file}: row {i}: {name!r} has an empty {label_col!r}")
        files.append(f)
        labels.append(label.strip())
    if valid_column:
        flags = table[valid_column].str.strip().str.lower()
        bad = ~flags.isin(TRUTHY | FALSY)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{csv_file}: column {valid_column!r} row {i + 1}: "
                            f"{table[valid_column].iloc[i]!r} is not true/false")
        split = np.where(flags.isin(TRUTHY), "valid", "train")
    else:
        split = np.full(len(files), "", dtype=object)
    return CsvListing(files, labels, split)
