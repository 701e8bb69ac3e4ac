"""Portable inference for an exported image classifier: numpy, pandas, PIL and onnxruntime only.

Copied into the export folder as predict.py, so `python export/<recipe>/predict.py a.png b.png`
labels image files on a machine without this project. It must import nothing from `coursepipe`.
preprocessing.json holds the declared preprocessing (mode, size, resize method, classes; the
mean/std are recorded there and applied inside the graph, which takes uint8 pixels). Training
decodes with these same functions (coursepipe/vision/images.py imports them), so the two agree.
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


def decode_many(blobs: Iterable[bytes], mode: str, size: tuple[int, int], method: str = "squish") -> np.ndarray:
    """uint8 (N, C, H, W) for a sequence of image bytes."""
    arrays = [decode(b, mode, size, method) for b in blobs]
    if not arrays:
        return np.zeros((0, CHANNELS[mode], size[1], size[0]), np.uint8)
    return np.stack(arrays)


def preprocess(state: dict, blobs: Iterable[bytes]) -> np.ndarray:
    """The model input for image bytes: uint8 (N, C, H, W) as the state declares."""
    return decode_many(blobs, state["mode"], tuple(state["size"]), state["resize"])


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


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(sess, state: dict, blobs: list[bytes], bs: int = 256) -> np.ndarray:
    """Class probabilities (N, n_classes), `bs` images at a time."""
    name = sess.get_inputs()[0].name
    out = [softmax(sess.run(None, {name: preprocess(state, blobs[i:i + bs])})[0])
           for i in range(0, len(blobs), bs)]
    return np.concatenate(out) if out else np.zeros((0, len(state["classes"])), np.float32)


def outputs(sess, state: dict, df: pd.DataFrame) -> np.ndarray:
    """What parity compares: class probabilities from the rows' raw image bytes."""
    return predict_proba(sess, state, image_bytes(df))


def finish(raw: np.ndarray, state: dict) -> np.ndarray:
    """The same numbers from the PyTorch model's raw output (logits)."""
    return softmax(raw)


def predict_frame(export_dir: str | Path, df: pd.DataFrame) -> pd.DataFrame:
    """`df` with the predicted label and its probability appended."""
    sess, state = load(export_dir)
    proba = predict_proba(sess, state, image_bytes(df))
    out = df.drop(columns=["image"], errors="ignore")
    out["prediction"] = np.asarray(state["classes"], dtype=object)[proba.argmax(1)]
    out["probability"] = proba.max(1)
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
        print("usage: predict.py IMAGE [IMAGE ...]   (prints path,prediction,probability as CSV)",
              file=sys.stderr)
        return 2
    try:
        out = predict_frame(Path(__file__).resolve().parent, pd.DataFrame({"path": argv}))
    except (KeyError, FileNotFoundError, OSError) as e:  # a missing or unreadable file: one line
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 1
    write_csv(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
