"""Portable inference for an exported segmentation model: numpy, pandas, PIL and onnxruntime only.

Copied into the export folder as predict.py: `python export/<recipe>/predict.py a.png b.png
[--out DIR]` writes a colour mask PNG per input file (DIR/<name>_mask.png, at the input's own
size) and prints path,mask,<share of each class> as CSV. It imports nothing from `coursepipe`.
preprocessing.json holds the declared input (size, resize), the classes, the void class and the
palette; mean/std are applied inside the graph, which takes uint8 pixels of any height and width.
Training decodes images and masks with these same functions (coursepipe/vision/masks.py imports
them). to_mode and fit_size repeat portable_image.py's few lines: an export folder holds only
its own predict.py, so it cannot import the image kind's.
"""
from __future__ import annotations

import colorsys
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
IGNORE = 255                    # mask value of void pixels (and augmentation's padding): not scored


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


def fit_size(im, size: tuple[int, int], method: str, resample):
    """Resize to (width, height): `squish` stretches, `crop` scales the short side then centre-crops."""
    w, h = size
    if im.size == (w, h):
        return im
    if method == "crop":
        scale = max(w / im.size[0], h / im.size[1])
        im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))), resample)
        left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
        return im.crop((left, top, left + w, top + h))
    return im.resize((w, h), resample)


def decode(data: bytes, size: tuple[int, int], method: str = "squish") -> np.ndarray:
    """One image's bytes -> uint8 (3, H, W) at `size` (width, height), bilinear."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(fit_size(to_mode(im, "RGB"), tuple(size), method, Image.Resampling.BILINEAR),
                         dtype=np.uint8)
    return arr.transpose(2, 0, 1)


def decode_mask(data: bytes, size: tuple[int, int], void: int, method: str = "squish") -> np.ndarray:
    """One mask's bytes -> int64 class indices (H, W) at `size`, nearest-neighbour (a resized mask
    never invents a class between two others); the void class becomes IGNORE."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:  # a P mask's indices are its classes: never convert it
        arr = np.asarray(fit_size(im, tuple(size), method, Image.Resampling.NEAREST), dtype=np.int64)
    if void >= 0:
        arr = np.where(arr == void, IGNORE, arr)
    return arr


def decode_many(blobs: Iterable[bytes], size: tuple[int, int], method: str = "squish") -> np.ndarray:
    arrays = [decode(b, size, method) for b in blobs]
    return np.stack(arrays) if arrays else np.zeros((0, 3, size[1], size[0]), np.uint8)


def decode_masks(blobs: Iterable[bytes], size: tuple[int, int], void: int, method: str = "squish") -> np.ndarray:
    arrays = [decode_mask(b, size, void, method) for b in blobs]
    return np.stack(arrays) if arrays else np.zeros((0, size[1], size[0]), np.int64)


def image_bytes(df: pd.DataFrame) -> list[bytes]:
    """Rows' images: the `image` column (bytes) when present, else the files named by `path`."""
    if "image" in df.columns:
        return list(df["image"])
    if "path" in df.columns:
        return [Path(p).read_bytes() for p in df["path"]]
    raise KeyError(f"input needs an 'image' (bytes) or 'path' column; got {list(df.columns)}")


# ----------------------------------------------------------------------------- colours

# CamVid's own label colours (its label_colors.txt; SegNet's Pavement is its 12-class colour), so
# masks look as CamVid viewers show them; other names get spread hues
CAMVID_COLOURS = {
    "Animal": (64, 128, 64), "Archway": (192, 0, 128), "Bicyclist": (0, 128, 192), "Bridge": (0, 128, 64),
    "Building": (128, 0, 0), "Car": (64, 0, 128), "CartLuggagePram": (64, 0, 192), "Child": (192, 128, 64),
    "Column_Pole": (192, 192, 128), "Pole": (192, 192, 128), "Fence": (64, 64, 128),
    "LaneMkgsDriv": (128, 0, 192), "LaneMkgsNonDriv": (192, 0, 64), "Misc_Text": (128, 128, 64),
    "MotorcycleScooter": (192, 0, 192), "OtherMoving": (128, 64, 64), "ParkingBlock": (64, 192, 128),
    "Pedestrian": (64, 64, 0), "Road": (128, 64, 128), "RoadShoulder": (128, 128, 192),
    "Sidewalk": (0, 0, 192), "Pavement": (60, 40, 222), "SignSymbol": (192, 128, 128), "Sky": (128, 128, 128),
    "SUVPickupTruck": (64, 128, 192), "TrafficCone": (0, 0, 64), "TrafficLight": (0, 64, 64),
    "Train": (192, 64, 128), "Tree": (128, 128, 0), "Truck_Bus": (192, 128, 192), "Tunnel": (64, 0, 64),
    "VegetationMisc": (192, 192, 0), "Wall": (64, 192, 0)}


def palette(classes: list[str], void: int) -> list[list[int]]:
    """An RGB colour per class: CamVid's for its class names, else hues spread by the golden
    ratio (two brightness levels); the void class black."""
    out = []
    for i, name in enumerate(classes):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95 if i % 2 == 0 else 0.65)
        out.append(list(CAMVID_COLOURS.get(name, (int(r * 255), int(g * 255), int(b * 255)))))
    if 0 <= void < len(classes):
        out[void] = [0, 0, 0]
    return out


def colourise(mask: np.ndarray, colours) -> np.ndarray:
    """(H, W) class indices -> uint8 (H, W, 3); IGNORE and unknown indices are black."""
    table = np.zeros((256, 3), np.uint8)
    table[:len(colours)] = np.asarray(colours, np.uint8)
    return table[np.clip(mask, 0, 255).astype(np.int64)]


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
    """Over the class axis (1) of (N, C, H, W) logits."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(sess, state: dict, blobs: list[bytes], bs: int = 16) -> np.ndarray:
    """Per-pixel class probabilities (N, n_classes, H, W) at the model's size."""
    name = sess.get_inputs()[0].name
    out = [softmax(sess.run(None, {name: decode_many(blobs[i:i + bs], tuple(state["size"]), state["resize"])})[0])
           for i in range(0, len(blobs), bs)]
    w, h = state["size"]
    return np.concatenate(out) if out else np.zeros((0, len(state["classes"]), h, w), np.float32)


def outputs(sess, state: dict, df: pd.DataFrame) -> np.ndarray:
    """What parity compares: per-pixel probabilities from the rows' raw image bytes."""
    return predict_proba(sess, state, image_bytes(df))


def finish(raw: np.ndarray, state: dict) -> np.ndarray:
    """The same numbers from the PyTorch model's raw output (logits)."""
    return softmax(raw)


def original_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.size


def predict_masks(sess, state: dict, blobs: list[bytes]) -> list[np.ndarray]:
    """Each image's predicted class indices (H, W) at its own size (nearest-neighbour back from
    the model's size)."""
    from PIL import Image

    masks = []
    for data, p in zip(blobs, predict_proba(sess, state, blobs)):
        small = Image.fromarray(p.argmax(0).astype(np.uint8), "L")
        masks.append(np.asarray(small.resize(original_size(data), Image.Resampling.NEAREST), dtype=np.int64))
    return masks


def mask_png(mask: np.ndarray, state: dict) -> bytes:
    """A predicted mask as a colour PNG in the export's palette."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(colourise(mask, state["palette"]), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def shares(mask: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(mask.ravel(), minlength=n)[:n]
    return counts / max(counts.sum(), 1)


def predict_frame(export_dir: str | Path, df: pd.DataFrame) -> pd.DataFrame:
    """`df` with each row's predicted mask (colour PNG bytes, the image's own size) and the share
    of its pixels in each class appended."""
    sess, state = load(export_dir)
    blobs = image_bytes(df)
    masks = predict_masks(sess, state, blobs)
    out = df.drop(columns=["image"], errors="ignore").reset_index(drop=True)
    out["mask"] = [mask_png(m, state) for m in masks]
    n = len(state["classes"])
    table = np.array([shares(m, n) for m in masks]).reshape(len(masks), n)
    for i, c in enumerate(state["classes"]):
        out[f"share_{c}"] = table[:, i]
    return out


def predict_files(export_dir: str | Path, files: list[Path], out_dir: Path) -> pd.DataFrame:
    """Write out_dir/<name>_mask.png for each file; one row per file: path, mask, class shares."""
    sess, state = load(export_dir)
    blobs = [Path(f).read_bytes() for f in files]
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for f, mask in zip(files, predict_masks(sess, state, blobs)):
        dest = out_dir / f"{Path(f).stem}_mask.png"
        dest.write_bytes(mask_png(mask, state))
        rows.append({"path": str(f), "mask": str(dest),
                     **{f"share_{c}": round(float(s), 4) for c, s in zip(state["classes"], shares(mask, len(state["classes"])))}})
    return pd.DataFrame(rows)


def write_csv(df: pd.DataFrame, dest) -> None:
    """portable_csv.write_csv, loaded by path from the file beside this one."""
    import importlib.util

    path = Path(__file__).resolve().parent / "portable_csv.py"
    spec = importlib.util.spec_from_file_location("portable_csv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_csv(df, dest)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    out_dir = Path("masks")
    if "--out" in argv:
        i = argv.index("--out")
        if i + 1 >= len(argv):
            print("predict.py: error: --out needs a folder", file=sys.stderr)
            return 2
        out_dir = Path(argv[i + 1])
        del argv[i:i + 2]
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: predict.py IMAGE [IMAGE ...] [--out DIR]   (writes DIR/<name>_mask.png, "
              "default DIR masks/; prints path,mask,share_<class>... as CSV)", file=sys.stderr)
        return 2
    try:
        out = predict_files(Path(__file__).resolve().parent, [Path(a) for a in argv], out_dir)
    except (KeyError, FileNotFoundError, OSError) as e:  # a missing or unreadable file: one line
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 1
    write_csv(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
