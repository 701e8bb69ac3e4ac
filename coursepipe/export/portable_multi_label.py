"""Portable inference for an exported multi-label image model: numpy, pandas, PIL and onnxruntime only.

Copied into the export folder as predict.py, so `python export/<recipe>/predict.py a.jpg b.jpg`
tags image files on a machine without this project; it must import nothing from `coursepipe`.
preprocessing.json holds the declared input (mode, size, resize), the tags and the decision
threshold the model was trained and scored with; mean/std are applied inside the graph, which
takes uint8 pixels. The decoding functions are the image kind's (export/portable_image.py), copied
because an export folder holds this one file: the export stage's parity check compares this
module's output, from the raw image bytes, with PyTorch's on the training side's decoded pixels,
so the two copies cannot drift apart unnoticed.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

MODEL_FILE = "model.onnx"
STATE_FILE = "preprocessing.json"
METADATA_KEY = "preprocessing"  # model.onnx metadata_props entry holding the same JSON
CHANNELS = {"L": 1, "RGB": 3}


# ----------------------------------------------------------------------------- preprocessing

def to_mode(im, mode: str):
    """PIL image in `mode`; transparency is composited on white first (else it turns black)."""
    from PIL import Image

    if im.mode == mode:
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert(mode)


def fit_size(im, size: tuple[int, int], method: str):
    """Resize to (width, height): `squish` stretches, `crop` scales the short side then centre-crops."""
    from PIL import Image

    w, h = size
    if im.size == (w, h):
        return im
    if method == "crop":
        scale = max(w / im.size[0], h / im.size[1])
        im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))),
                       Image.Resampling.BILINEAR)
        left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
        return im.crop((left, top, left + w, top + h))
    return im.resize((w, h), Image.Resampling.BILINEAR)


def decode(data: bytes, mode: str, size: tuple[int, int], method: str = "squish") -> np.ndarray:
    """One image's bytes -> uint8 (C, H, W) in `mode` at `size` (width, height)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(fit_size(to_mode(im, mode), tuple(size), method), dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def preprocess(state: dict, blobs: Iterable[bytes]) -> np.ndarray:
    """The model input for image bytes: uint8 (N, C, H, W) as the state declares."""
    arrays = [decode(b, state["mode"], tuple(state["size"]), state["resize"]) for b in blobs]
    if not arrays:
        w, h = state["size"]
        return np.zeros((0, CHANNELS[state["mode"]], h, w), np.uint8)
    return np.stack(arrays)


def image_bytes(df: pd.DataFrame) -> list[bytes]:
    """Rows' images: the `image` column (bytes) when present, else the files named by `path`."""
    if "image" in df.columns:
        return list(df["image"])
    if "path" in df.columns:
        return [Path(p).read_bytes() for p in df["path"]]
    raise KeyError(f"input needs an 'image' (bytes) or 'path' column; got {list(df.columns)}")


# ----------------------------------------------------------------------------- the model

def load(export_dir: str | Path):
    """(onnxruntime session, preprocessing state) from an export folder (state from the JSON,
    or from model.onnx's metadata when only the model file was copied)."""
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


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def predict_proba(sess, state: dict, blobs: list[bytes], bs: int = 256) -> np.ndarray:
    """Per-tag probabilities (N, n_tags), each tag on its own (sigmoid), `bs` images at a time."""
    name = sess.get_inputs()[0].name
    out = [sigmoid(sess.run(None, {name: preprocess(state, blobs[i:i + bs])})[0])
           for i in range(0, len(blobs), bs)]
    return np.concatenate(out) if out else np.zeros((0, len(state["classes"])), np.float32)


def tags_above(proba: np.ndarray, classes: list[str], threshold: float) -> list[list[tuple[str, float]]]:
    """Per image: (tag, probability) above the threshold, most probable first."""
    out = []
    for p in proba:
        order = np.argsort(-p, kind="stable")
        out.append([(classes[i], float(p[i])) for i in order if p[i] > threshold])
    return out


def outputs(sess, state: dict, df: pd.DataFrame) -> np.ndarray:
    """What parity compares: per-tag probabilities from the rows' raw image bytes."""
    return predict_proba(sess, state, image_bytes(df))


def finish(raw: np.ndarray, state: dict) -> np.ndarray:
    """The same numbers from the PyTorch model's raw output (logits)."""
    return sigmoid(raw)


def predict_frame(export_dir: str | Path, df: pd.DataFrame, threshold: float | None = None) -> pd.DataFrame:
    """`df` with the predicted tags (space-joined, most probable first) and their probabilities
    appended; `threshold` None takes the one the model was scored with."""
    sess, state = load(export_dir)
    t = state["threshold"] if threshold is None else threshold
    found = tags_above(predict_proba(sess, state, image_bytes(df)), list(state["classes"]), t)
    out = df.drop(columns=["image"], errors="ignore")
    out["tags"] = [" ".join(tag for tag, _ in row) for row in found]
    out["probabilities"] = [" ".join(f"{p:.3f}" for _, p in row) for row in found]
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
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: predict.py [--threshold T] IMAGE [IMAGE ...]   (prints path,tags,probabilities as CSV)",
              file=sys.stderr)
        return 2
    threshold = None
    if argv[0] == "--threshold":
        try:
            threshold = float(argv[1])
        except (IndexError, ValueError):
            print("predict.py: error: --threshold needs a number in (0, 1)", file=sys.stderr)
            return 2
        argv = argv[2:]
    try:
        out = predict_frame(Path(__file__).resolve().parent, pd.DataFrame({"path": argv}), threshold)
    except (KeyError, FileNotFoundError, OSError) as e:  # a missing or unreadable file: one line
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 1
    write_csv(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
