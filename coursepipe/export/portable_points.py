"""Portable inference for an exported point regressor: numpy, pandas, PIL and onnxruntime only.

Copied into the export folder as predict.py: `python export/<recipe>/predict.py a.jpg b.jpg`
prints, per file, the point (x, y) in pixels of that file as given (any size: the image is
squished to the model's size, which maps the frame linearly, and the model's [-1, 1] output is
scaled back by the file's own width and height). It must import nothing from `coursepipe`.
preprocessing.json holds the declared input (mode, size) and the units; the mean/std are applied
inside the graph, which takes uint8 pixels. Training decodes with these same functions
(coursepipe/kinds/points.py imports them), so the two agree.
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


def decode(data: bytes, mode: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """One image's bytes -> (uint8 (C, H, W) squished to `size` (width, height), its own (w, h)).
    Squish, never crop: a crop could cut the point out of the frame."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        own = im.size
        im = to_mode(im, mode)
        if im.size != tuple(size):
            im = im.resize(tuple(size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), own


def decode_many(blobs: Iterable[bytes], mode: str, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, C, H, W), (N, 2) original widths and heights) for a sequence of image bytes."""
    pairs = [decode(b, mode, size) for b in blobs]
    if not pairs:
        return np.zeros((0, 1 if mode == "L" else 3, size[1], size[0]), np.uint8), np.zeros((0, 2))
    return np.stack([a for a, _ in pairs]), np.asarray([s for _, s in pairs], np.float64)


def image_bytes(df: pd.DataFrame) -> list[bytes]:
    """Rows' images: the `image` column (bytes) when present, else the files named by `path`."""
    if "image" in df.columns:
        return list(df["image"])
    if "path" in df.columns:
        return [Path(p).read_bytes() for p in df["path"]]
    raise KeyError(f"input needs an 'image' (bytes) or 'path' column; got {list(df.columns)}")


def to_pixels(uv: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """[-1, 1] units -> pixels of images of `sizes` (N, 2) (width, height): (u + 1) * side / 2."""
    return (np.asarray(uv, np.float64) + 1.0) * sizes / 2.0


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


def predict_units(sess, state: dict, blobs: list[bytes], bs: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """((N, 2) points in [-1, 1] units as (x, y), (N, 2) each image's own width and height)."""
    name = sess.get_inputs()[0].name
    units, sizes = [], []
    for i in range(0, len(blobs), bs):
        x, own = decode_many(blobs[i:i + bs], state["mode"], tuple(state["size"]))
        units.append(sess.run(None, {name: x})[0].astype(np.float64))
        sizes.append(own)
    if not units:
        return np.zeros((0, 2)), np.zeros((0, 2))
    return np.concatenate(units), np.concatenate(sizes)


def predict_points(sess, state: dict, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """((N, 2) points (x, y) in pixels of each input image, (N, 2) its width and height)."""
    units, sizes = predict_units(sess, state, blobs)
    return to_pixels(units, sizes), sizes


def outputs(sess, state: dict, df: pd.DataFrame) -> np.ndarray:
    """What parity compares: the points in units, from the rows' raw image bytes."""
    return predict_units(sess, state, image_bytes(df))[0]


def finish(raw: np.ndarray, state: dict) -> np.ndarray:
    """The same numbers from the PyTorch model's raw output (already units)."""
    return np.asarray(raw, np.float64)


def predict_frame(export_dir: str | Path, df: pd.DataFrame) -> pd.DataFrame:
    """`df` with the predicted point (x, y, pixels of each image) and the image's size appended."""
    sess, state = load(export_dir)
    xy, sizes = predict_points(sess, state, image_bytes(df))
    out = df.drop(columns=["image"], errors="ignore")
    out["x"], out["y"] = xy[:, 0], xy[:, 1]
    out["width"], out["height"] = sizes[:, 0].astype(int), sizes[:, 1].astype(int)
    return out


def write_csv(df: pd.DataFrame, dest) -> None:
    """portable_csv.write_csv, from the file beside this one (loaded by path, as predict.py)."""
    import importlib.util

    path = Path(__file__).resolve().parent / "portable_csv.py"
    spec = importlib.util.spec_from_file_location("portable_csv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_csv(df, dest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: predict.py IMAGE [IMAGE ...]   (prints path,x,y,width,height as CSV; x, y "
              "in pixels of each image)", file=sys.stderr)
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
