"""mnist (lesson 7): handwritten digits, a ResNet trained from scratch (and lesson 5's simple nets).

Layout (fastai URLs.MNIST): mnist_png/{training,testing}/<digit>/<n>.png; the `testing` folder
is the validation set. The prepared table is the image manifest (one row per file: path, label,
size, mode, decodable, sha256, cross-split duplicates, the PNG bytes), so the suite can name bad
files and training workers read no files. Course result: accuracy 0.995 on full MNIST (60k);
fastai 2.8.12's lesson-7 net reaches 0.9905 on this project's 8k/2k real subset (12 epochs).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.data.archive import deterministic_tgz
from coursepipe.kinds.image import TARGET, ImageClassification, ScratchNet, manifest_table

ROOT = "mnist_png"
FOLDERS = ("training", "testing")      # training rows / validation rows
VALID_FOLDER = "testing"
CLASSES = tuple(str(d) for d in range(10))

# validation schema (coursepipe/validation/suites.py): the manifest normalise() returns; size
# bounds come from params (validate.image_side), the image rules from the kind
COLUMNS = ("path", "folder", "label", "width", "height", "mode", "decodable", "decode_error",
           "sha256", "excluded", "duplicate", "class_images", "image")
CATEGORIES = {"folder": FOLDERS}
PATH_REGEX = rf"^{ROOT}/(?:{'|'.join(FOLDERS)})/[0-9]/[^/]+$"


# ----------------------------------------------------------------------------- raw data

def read_raw(extracted: Path, p=None) -> pd.DataFrame:
    """The manifest of every image under mnist_png/ (label = its folder name, checked later)."""
    from coursepipe.vision.manifest import image_files

    base = extracted / ROOT
    if not base.is_dir():
        found = sorted(p.name for p in extracted.iterdir())[:5]
        raise FileNotFoundError(f"archive has no {ROOT}/ folder (top level: {found or 'empty'})")
    files = image_files(base)
    if not files:
        raise FileNotFoundError(f"{ROOT}/ holds no image files")
    # mnist_png/<folder>/<label>/<file>: a file elsewhere keeps its parent as label and fails the
    # path rule, so the report names it instead of it vanishing
    df = manifest_table([(f, f.parent.name) for f in files], extracted)
    df["folder"] = [Path(p).parts[1] if len(Path(p).parts) > 2 else "" for p in df["path"]]
    return df


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """The manifest's columns in the schema's order."""
    return df[list(COLUMNS)]


def split(df: pd.DataFrame, p=None) -> np.ndarray:
    """The `testing` folder is the validation set (the course's split)."""
    return (df["folder"] == VALID_FOLDER).to_numpy()


# ----------------------------------------------------------------------------- synthetic sample

def digit_png(digit: int, rng: np.random.Generator, font) -> bytes:
    """A 28x28 white-on-black digit: a font glyph at a random scale, slant and offset, plus noise."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (56, 56), 0)
    ImageDraw.Draw(canvas).text((28, 28), str(digit), fill=255, font=font, anchor="mm")
    angle = float(rng.uniform(-15, 15))
    scale = float(rng.uniform(0.75, 1.1))
    canvas = canvas.rotate(angle, resample=Image.Resampling.BILINEAR)
    side = int(round(56 / scale))
    dx, dy = rng.integers(-5, 6, size=2)
    left, top = (56 - side) // 2 + int(dx), (56 - side) // 2 + int(dy)
    img = canvas.crop((left, top, left + side, top + side)).resize((28, 28), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.float64) * rng.uniform(0.7, 1.0)
    arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def synthesize(rows: int | None = None, seed: int = 0) -> bytes:
    """A SYNTHETIC mnist_png archive: PIL's own font's digits, jittered and noisy, not handwriting.

    `rows` training images (default 1000, split evenly over the digits) plus a fifth as many in
    testing/; the file names say `synthetic`."""
    from PIL import ImageFont

    rows = rows or 1000
    per_class = max(1, rows // len(CLASSES))
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=30)
    files = {}
    for folder, n in (("training", per_class), ("testing", max(1, per_class // 5))):
        for d in range(len(CLASSES)):
            for i in range(n):
                files[f"{ROOT}/{folder}/{d}/synthetic_{i:05d}.png"] = digit_png(d, rng, font)
    return deterministic_tgz(files)


# ----------------------------------------------------------------------------- the recipe

RECIPE = Recipe(
    name="mnist",
    course=("accuracy", 0.995, "lesson 7, full MNIST"),
    kind=ImageClassification(),
    schema=Schema(columns=COLUMNS, target=TARGET, categories=CATEGORIES, classes=CLASSES,
                  patterns={"path": PATH_REGEX}),
    model_config=ScratchNet,
    synthesize=synthesize,
    read_raw=read_raw,
    normalise=normalise,
    split=split,
)
