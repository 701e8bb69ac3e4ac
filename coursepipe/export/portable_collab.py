"""Portable rating prediction for an exported collaborative-filtering model: numpy, pandas, onnxruntime.

Copied into the export folder as predict.py; it must import nothing from `coursepipe`.
  python predict.py ratings.csv [OUT.csv]     user,item columns (or userId,movieId) -> prediction
  python predict.py --user 42 --top 10        the 10 known items with the highest predicted rating
Ids never seen in training map to the #na# embedding (index 0), as fastai does.
The same `encode` turns ids into indices in training, so export and training cannot drift apart.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

NA = "#na#"  # index 0 of the user and item vocabularies: unseen at training time
MODEL_FILE = "model.onnx"
STATE_FILE = "preprocessing.json"
METADATA_KEY = "preprocessing"  # model.onnx metadata_props entry holding the same JSON
ALIASES = {"user": ("user", "userId", "user_id"), "item": ("item", "movieId", "item_id", "movie")}


def column(df: pd.DataFrame, name: str) -> pd.Series:
    """The `user` / `item` column of df under any of its known spellings."""
    for alias in ALIASES[name]:
        if alias in df.columns:
            return df[alias]
    raise KeyError(f"input is missing a {name!r} column (any of {list(ALIASES[name])}); "
                   f"got {list(df.columns)}")


def as_ids(values: pd.Series) -> np.ndarray:
    """Ids as int64; anything that is not a whole number becomes -1 (never a known id)."""
    x = pd.to_numeric(values, errors="coerce").astype("float64").to_numpy()
    ok = np.isfinite(x) & (x == np.round(x))
    return np.where(ok, np.nan_to_num(x), -1).astype(np.int64)


def lookup(vocab: list[int], ids: np.ndarray) -> np.ndarray:
    """Indices into [#na#, *vocab] (vocab sorted ascending); unknown ids map to 0."""
    v = np.asarray(vocab, dtype=np.int64)
    pos = np.clip(np.searchsorted(v, ids), 0, max(len(v) - 1, 0))
    hit = (v[pos] == ids) if len(v) else np.zeros(len(ids), bool)
    return np.where(hit, pos + 1, 0).astype(np.int64)


def encode(state: dict, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(user indices, item indices) int64 for the rows of df."""
    return (lookup(state["users"], as_ids(column(df, "user"))),
            lookup(state["items"], as_ids(column(df, "item"))))


def load(export_dir: str | Path):
    """(onnxruntime session, state) from an export folder (state from the JSON, else model.onnx)."""
    import onnxruntime as ort

    export_dir = Path(export_dir)
    model = export_dir / MODEL_FILE
    if not model.is_file():
        raise FileNotFoundError(f"{model} is missing: run the export stage first")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    state_file = export_dir / STATE_FILE
    if state_file.is_file():
        return sess, json.loads(state_file.read_text())
    embedded = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if embedded is None:
        raise FileNotFoundError(f"{state_file} is missing and {model} embeds no {METADATA_KEY!r}")
    return sess, json.loads(embedded)


def run_indices(sess, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    names = [i.name for i in sess.get_inputs()]
    (out,) = sess.run(None, dict(zip(names, (users, items))))
    return np.asarray(out, dtype=np.float32).reshape(-1)


def outputs(sess, state: dict, df: pd.DataFrame) -> np.ndarray:
    """What parity compares: predicted ratings (N,) from raw rows."""
    return run_indices(sess, *encode(state, df))


def finish(raw: np.ndarray, state: dict) -> np.ndarray:
    """The same numbers from the PyTorch model's output (already on the rating scale)."""
    return np.asarray(raw, dtype=np.float32).reshape(-1)


def predict_frame(export_dir: str | Path, df: pd.DataFrame) -> pd.DataFrame:
    """`df` with `prediction` (the rating) and `known_user` / `known_item` flags appended."""
    sess, state = load(export_dir)
    users, items = encode(state, df)
    out = df.copy()
    out["prediction"] = run_indices(sess, users, items)
    out["known_user"], out["known_item"] = users > 0, items > 0
    return out


def top_items(export_dir: str | Path, user: int, n: int) -> pd.DataFrame:
    """The n known items with the highest predicted rating for `user` (all items are scored)."""
    return rank_items(*load(export_dir), user, n)


def rank_items(sess, state: dict, user: int, n: int) -> pd.DataFrame:
    """top_items on a loaded model (a server keeps one session for every request)."""
    items = np.asarray(state["items"], dtype=np.int64)
    users = lookup(state["users"], np.full(len(items), user, dtype=np.int64))
    scores = run_indices(sess, users, np.arange(1, len(items) + 1, dtype=np.int64))
    order = np.argsort(-scores, kind="stable")[:n]
    titles = state.get("titles") or [None] * len(items)
    return pd.DataFrame({"rank": np.arange(1, len(order) + 1), "user": user, "item": items[order],
                         "title": [titles[i] for i in order], "prediction": scores[order],
                         "known_user": bool(users[0] > 0)})


def write_csv(df: pd.DataFrame, dest) -> None:
    """portable_csv.write_csv, from the file beside this one (coursepipe/export/ or the export
    folder, where it is copied): loaded by path, so predict.py needs no package on sys.path."""
    import importlib.util

    path = Path(__file__).resolve().parent / "portable_csv.py"
    spec = importlib.util.spec_from_file_location("portable_csv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_csv(df, dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="predict.py", description="rate (user, item) pairs with this export")
    p.add_argument("rows", nargs="?", help="CSV with user,item (or userId,movieId) columns")
    p.add_argument("out", nargs="?", help="output CSV (default: stdout)")
    p.add_argument("--user", type=int, help="rank every known item for this user id")
    p.add_argument("--top", type=int, default=10, help="how many items --user lists")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if (args.rows is None) == (args.user is None):
        p.print_usage(sys.stderr)
        print("predict.py: error: give either ROWS.csv or --user ID", file=sys.stderr)
        return 2
    here = Path(__file__).resolve().parent
    try:
        out = (top_items(here, args.user, args.top) if args.user is not None
               else predict_frame(here, pd.read_csv(args.rows)))
    except (KeyError, FileNotFoundError) as e:  # a missing column or file: one clear line
        print(f"predict.py: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    write_csv(out, args.out or sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
