"""Reading a raw CSV so that every way it can be broken is named: file, line, column, value.

pandas alone loses the culprit: a 0-byte file is "No columns to parse from file", a file cut
mid-row silently fills the short row with missing values (which validation then reports as
"not null" failures with no line), and text in a numeric column becomes missing when coerced.
"""
from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

MAX_LISTED = 3  # culprits quoted per message; the count says how many there are


class DataError(ValueError):
    """Raw data that cannot be read as its layout says; the message names where and what."""


def row_widths(path: Path, label: str, sep: str, header: bool) -> None:
    """Every non-blank line has as many fields as the first (the header when there is one)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter=sep)
        expected, bad, n_bad = None, [], 0
        for fields in reader:
            if not fields or fields == [""]:
                continue  # pandas skips blank lines too
            if expected is None:
                expected = len(fields)
                continue
            if len(fields) != expected:
                n_bad += 1
                if len(bad) < MAX_LISTED:
                    bad.append(f"line {reader.line_num} has {len(fields)}")
    if n_bad:
        first = "the header" if header else "line 1"
        hint = " (a truncated or damaged file?)" if n_bad == 1 else ""
        raise DataError(f"{label}: {n_bad} line(s) with a different number of fields than "
                        f"{first} ({expected}): {', '.join(bad)}{hint}")


def read_csv(path: str | Path, label: str | None = None, sep: str = ",", header: bool = True,
             **kwargs) -> pd.DataFrame:
    """pd.read_csv(path, sep=sep, ...) after checking the file is not empty and no row is short
    or long; every failure is a DataError naming `label` (default: the file name)."""
    path = Path(path)
    label = label or path.name
    if path.stat().st_size == 0:
        raise DataError(f"{label} is empty (0 bytes)")
    row_widths(path, label, sep, header)
    try:
        return pd.read_csv(path, sep=sep, header=0 if header else None, **kwargs)
    except pd.errors.EmptyDataError:
        raise DataError(f"{label} has no rows or columns (only blank lines)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{label}: {str(e).strip().splitlines()[0]}") from None


def to_number(values: pd.Series, column: str, label: str) -> pd.Series:
    """float64 of a column that must be numeric; missing stays missing, but text is an error
    quoting the rows (1-based data rows) and values."""
    x = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = x.isna() & values.notna()
    if bad.any():
        where = bad[bad].index[:MAX_LISTED]
        shown = ", ".join(f"row {values.index.get_loc(i) + 1}: {values[i]!r}" for i in where)
        raise DataError(f"{label}: column {column!r} has {int(bad.sum())} non-numeric "
                        f"value(s), e.g. {shown}")
    return x
