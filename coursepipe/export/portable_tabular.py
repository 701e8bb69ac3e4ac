"""Portable inference for an exported model: numpy, pandas and onnxruntime only.

This file is copied into every export folder, so `python export/<recipe>/predict.py rows.csv`
works on a machine without this project. It must import nothing from `coursepipe`.
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


def predict_frame(export_dir: str | Path, df: pd.DataFrame) -> pd.DataFrame:
    """`df` with the predicted label and its probability appended."""
    sess, state = load(export_dir)
    proba = predict_proba(sess, state, df)
    out = df.copy()
    out["prediction"] = np.asarray(state["classes"], dtype=object)[proba.argmax(1)]
    out["probability"] = proba.max(1)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print("usage: predict.py ROWS.csv [OUT.csv]   (run from anywhere; reads this folder)", file=sys.stderr)
        return 2
    rows = pd.read_csv(argv[0], skipinitialspace=True, na_values=["?"])
    try:
        out = predict_frame(Path(__file__).resolve().parent, rows)
    except (KeyError, FileNotFoundError) as e:  # a missing column or file: one clear line
        print(f"predict.py: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    if len(argv) == 2:
        out.to_csv(argv[1], index=False)
    else:
        out.to_csv(sys.stdout, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
