"""Portable inference for an exported model: numpy, pandas and onnxruntime only.

This file is copied into every export folder (with portable_csv.py), so `python
export/<recipe>/predict.py rows.csv` works on a machine without this project. It must import
nothing from `coursepipe` except through the portable_csv fallback below.
The same `preprocess` is used in training, so export and training cannot drift apart.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

NA = "#na#"  # level 0 of every categorical column: missing or unseen at training time
MODEL_FILE = "model.onnx"
STATE_FILE = "preprocessing.json"
METADATA_KEY = "preprocessing"  # model.onnx metadata_props entry holding the same JSON


def _as_str(col: pd.Series) -> pd.Series:
    """Category values as stripped strings, missing as None (so 1 and '1' agree)."""
    s = col.astype("object")
    return s.where(s.notna(), None).map(lambda v: None if v is None else str(v).strip())


def preprocess(state: dict, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """FillMissing -> Categorify -> Normalize with statistics fitted on the training split.

    Returns (cats int64 [N, n_cat], conts float32 [N, n_cont]); unknown categories map to #na#.
    """
    needed = list(state["cat_names"]) + list(state["cont_names"])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise KeyError(f"input is missing column(s) {missing}; expected {needed}")
    cats, conts = [], []
    for col in state["cat_names"]:
        index = {v: i for i, v in enumerate(state["categories"][col])}
        cats.append(_as_str(df[col]).map(lambda v: index.get(v, 0)).to_numpy(np.int64))
    for col in state["na_names"]:  # fastai's FillMissing indicator: a category of its own
        index = {v: i for i, v in enumerate(state["categories"][f"{col}_na"])}
        flag = pd.to_numeric(df[col], errors="coerce").isna().map({True: "True", False: "False"})
        cats.append(flag.map(lambda v: index.get(v, 0)).to_numpy(np.int64))
    for col in state["cont_names"]:
        x = pd.to_numeric(df[col], errors="coerce").astype("float64").fillna(state["medians"][col])
        conts.append(((x - state["means"][col]) / state["stds"][col]).to_numpy(np.float32))
    n = len(df)
    return (np.stack(cats, 1) if cats else np.zeros((n, 0), np.int64),
            np.stack(conts, 1) if conts else np.zeros((n, 0), np.float32))


def load(export_dir: str | Path):
    """(onnxruntime session, preprocessing state) from an export folder.

    The state comes from preprocessing.json, or from model.onnx's metadata when only the model
    file was copied (the exporter embeds the same JSON under METADATA_KEY).
    """
    import onnxruntime as ort

    export_dir = Path(export_dir)
    model = export_dir / MODEL_FILE
    if not model.is_file():
        raise FileNotFoundError(f"{model} is missing: run the export stage first")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    state_file = export_dir / STATE_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
    else:
        embedded = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if embedded is None:
            raise FileNotFoundError(f"{state_file} is missing and {model} embeds no {METADATA_KEY!r}")
        state = json.loads(embedded)
    return sess, state


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(sess, state: dict, df: pd.DataFrame) -> np.ndarray:
    cats, conts = preprocess(state, df)
    names = [i.name for i in sess.get_inputs()]
    (logits,) = sess.run(None, dict(zip(names, (cats, conts))))
    return softmax(logits)


def outputs(sess, state: dict, df: pd.DataFrame) -> np.ndarray:
    """What parity compares: class probabilities from raw rows."""
    return predict_proba(sess, state, df)


def finish(raw: np.ndarray, state: dict) -> np.ndarray:
    """The same numbers from the model's raw output (logits)."""
    return softmax(raw)


def unparsed(state: dict, df: pd.DataFrame) -> pd.Series:
    """Per row, the number columns whose value is given but is not a number (`age='forty'`);
    "" for a clean row. Such a value is predicted on as missing (the training median)."""
    notes = pd.Series([""] * len(df), index=df.index, dtype=object)
    for col in state["cont_names"]:
        if col not in df.columns:
            continue
        given = df[col].notna() & (df[col].astype(str).str.strip() != "")
        bad = given & pd.to_numeric(df[col], errors="coerce").isna()
        for i in bad[bad].index:
            notes[i] = f"{notes[i]}; {col}={df[col][i]!r}" if notes[i] else f"{col}={df[col][i]!r}"
    return notes


def predict_frame(export_dir: str | Path, df: pd.DataFrame, strict: bool = False) -> pd.DataFrame:
    """`df` with the predicted label and its probability appended, and an `unparsed` column
    naming number cells that were not numbers; `strict` refuses such rows instead."""
    sess, state = load(export_dir)
    notes = unparsed(state, df)
    bad = [(n + 1, note) for n, note in enumerate(notes) if note]
    if bad and strict:
        shown = ", ".join(f"row {n}: {note}" for n, note in bad[:3])
        raise ValueError(f"{len(bad)} row(s) have values that are not numbers ({shown}); "
                         f"fix them, or drop --strict to predict on them as missing")
    proba = predict_proba(sess, state, df)
    out = df.copy()
    out["prediction"] = np.asarray(state["classes"], dtype=object)[proba.argmax(1)]
    out["probability"] = proba.max(1)
    out["unparsed"] = notes
    return out


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
    argv = sys.argv[1:] if argv is None else argv
    strict = "--strict" in argv
    argv = [a for a in argv if a != "--strict"]
    if len(argv) not in (1, 2):
        print("usage: predict.py [--strict] ROWS.csv [OUT.csv]   (run from anywhere; reads this folder)\n"
              "  --strict: refuse rows whose number columns hold text (default: predict on them as "
              "missing and name them in the `unparsed` column)", file=sys.stderr)
        return 2
    try:
        rows = pd.read_csv(argv[0], skipinitialspace=True, na_values=["?"])
        out = predict_frame(Path(__file__).resolve().parent, rows, strict=strict)
    except (KeyError, FileNotFoundError, ValueError) as e:  # a missing column or file, bad rows: one line
        print(f"predict.py: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    n_bad = int((out["unparsed"] != "").sum())
    if n_bad:
        print(f"predict.py: warning: {n_bad} row(s) have number cells that are not numbers, "
              f"predicted as missing (see the `unparsed` column; --strict refuses them)", file=sys.stderr)
    write_csv(out, argv[1] if len(argv) == 2 else sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
