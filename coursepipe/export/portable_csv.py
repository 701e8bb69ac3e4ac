"""CSV output that a spreadsheet cannot execute: copied beside every export's predict.py.

A cell starting with `=`, `+`, `-`, `@` (or a tab / carriage return) is a formula in Excel,
LibreOffice and Google Sheets (CSV injection, OWASP). Text cells that start so — a movie title,
a file name, an echoed input column — are written with a leading `'`, which those programs show
as text. Numbers are left as numbers. Imports nothing from `coursepipe`.
"""
from __future__ import annotations

import pandas as pd

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value):
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with every text cell that would start a formula prefixed by `'`."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(neutralise)
    out.columns = [neutralise(str(c)) for c in out.columns]
    return out


def write_csv(df: pd.DataFrame, dest) -> None:
    """Write `df` as CSV to a path or a text stream, formula cells neutralised."""
    safe_frame(df).to_csv(dest, index=False)
