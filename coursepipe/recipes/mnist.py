"""mnist (lesson 7): handwritten digits, a ResNet trained from scratch (and lesson 5's simple nets).

Layout (fastai URLs.MNIST): mnist_png/{training,testing}/<digit>/<n>.png; the `testing` folder
is the validation set. The prepared table is the image manifest (one row per file: path, label,
size, mode, decodable, sha256, cross-split duplicates, the PNG bytes), so the suite can name bad
files and training workers read no files. Course result: accuracy 0.995 on full MNIST (60k);
fastai 2.8.12's lesson-7 net reaches 0.9905 on this project's 8k/2k real subset (12 epochs).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.data.archive import deterministic_tgz

KIND = "image_classification"
PORTABLE = "coursepipe.export.portable_image"
ROOT = "mnist_png"
FOLDERS = ("training", "testing")      # training rows / validation rows
VALID_FOLDER = "testing"
CLASSES = tuple(str(d) for d in range(10))
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")  # source modes ModelConfig.mode can convert

# validation schema (coursepipe/validation/suites.py): the manifest normalise() returns
TARGET = "label"
COLUMNS = ("path", "folder", "label", "width", "height", "mode", "decodable", "decode_error",
           "sha256", "duplicate", "class_images", "image")
CATEGORIES = {"folder": FOLDERS}
RANGES: dict[str, tuple[float, float]] = {}   # size bounds come from params (validate.image_side)
PATH_REGEX = rf"^{ROOT}/(?:{'|'.join(FOLDERS)})/[0-9]/[^/]+$"


@dataclass(frozen=True)
class ModelConfig:
    """Input declaration, architecture and augmentation (flat: the bundle stores it as a dict)."""
    arch: str = "resnet"                  # resnet (lesson 7) | simple_cnn (lesson 7) | linear (lesson 5)
    widths: tuple[int, ...] = (8, 16, 32, 16)  # conv widths, one stride-2 stage each
    hidden: tuple[int, ...] = ()          # linear: hidden layers ([] = Mnist_Logistic, [50] = Mnist_NN)
    mode: str = "L"                       # every image is converted to this mode (recorded per source mode)
    size: tuple[int, int] = (28, 28)      # width, height fed to the model
    resize: str = "squish"                # squish | crop, for images of another size
    normalize: str = "data"               # data (training pixels' mean/std) | imagenet | none
    flip: bool = False                    # never for digits: a mirrored 2 is no digit
    max_rotate: float = 0.0               # degrees
    max_zoom: float = 1.0
    max_translate: float = 0.0            # fraction of the side (lesson 7: rand_pad(3) on 28 px ~ 0.1)
    max_warp: float = 0.0
    p_affine: float = 0.75
    max_lighting: float = 0.0
    p_lighting: float = 0.75
    top_losses: int = 9                   # evaluate: images in the top-losses grid

    def __post_init__(self):
        from coursepipe.config import ConfigError
        from coursepipe.models.vision import ARCHS
        from coursepipe.vision.images import CHANNELS
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: {self.arch!r} is not one of {list(ARCHS)}")
        if self.mode not in CHANNELS:
            raise ConfigError(f"mode: {self.mode!r} is not one of {list(CHANNELS)}")
        if self.resize not in ("squish", "crop"):
            raise ConfigError(f"resize: {self.resize!r} is not one of ['squish', 'crop']")
        if self.normalize not in ("data", "imagenet", "none"):
            raise ConfigError(f"normalize: {self.normalize!r} is not one of ['data', 'imagenet', 'none']")
        if min(self.size) < 1 or not self.widths and self.arch != "linear":
            raise ConfigError(f"size must be positive and widths non-empty, got {self.size}, {self.widths}")
        if self.max_zoom < 1:
            raise ConfigError(f"max_zoom must be >= 1, got {self.max_zoom}")


def augmentation(m: ModelConfig):
    from coursepipe.vision.augment import Augment
    return Augment(flip=m.flip, max_rotate=m.max_rotate, max_zoom=m.max_zoom,
                   max_translate=m.max_translate, max_warp=m.max_warp, p_affine=m.p_affine,
                   max_lighting=m.max_lighting, p_lighting=m.p_lighting)


# ----------------------------------------------------------------------------- raw data

def read_raw(extracted: Path) -> pd.DataFrame:
    """The manifest of every image under mnist_png/ (label = its folder name, checked later)."""
    from coursepipe.vision.manifest import image_files, manifest

    base = extracted / ROOT
    if not base.is_dir():
        found = sorted(p.name for p in extracted.iterdir())[:5]
        raise FileNotFoundError(f"archive has no {ROOT}/ folder (top level: {found or 'empty'})")
    files = image_files(base)
    if not files:
        raise FileNotFoundError(f"{ROOT}/ holds no image files")
    # mnist_png/<folder>/<label>/<file>: a file elsewhere keeps its parent as label and fails the
    # path rule, so the report names it instead of it vanishing
    df = manifest([(p, p.parent.name) for p in files], extracted)
    df["folder"] = [Path(p).parts[1] if len(Path(p).parts) > 2 else "" for p in df["path"]]
    return df


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Manifest + the checks that need every row: cross-split duplicates, images per class."""
    from coursepipe.vision.manifest import cross_split_duplicates, images_per_class

    out = df.copy()
    out["duplicate"] = cross_split_duplicates(out["sha256"], out["path"], out["folder"] == VALID_FOLDER)
    out["class_images"] = images_per_class(out["label"], out["folder"])
    return out[list(COLUMNS)]


def split(df: pd.DataFrame, cfg) -> np.ndarray:
    """The `testing` folder is the validation set (the course's split)."""
    return (df["folder"] == VALID_FOLDER).to_numpy()


def extra_expectations(v) -> list:
    """Readable files of known size and mode in the layout, enough per class, no cross-split copies.

    Rules whose failure should name files test columns that hold file names (decode_error,
    duplicate, path); size and mode rules skip undecodable rows (already named)."""
    lo, hi = v.image_side
    ok = {"row_condition": "decodable==True", "condition_parser": "pandas"}
    return [
        ("expect_column_values_to_match_regex", {"column": "path", "regex": PATH_REGEX}),
        ("expect_column_values_to_be_in_set", {"column": "decode_error", "value_set": [""]}),
        ("expect_column_values_to_be_in_set", {"column": "decodable", "value_set": [True]}),
        ("expect_column_values_to_be_in_set", {"column": "duplicate", "value_set": [""]}),
        ("expect_column_values_to_be_between", {"column": "width", "min_value": lo, "max_value": hi, **ok}),
        ("expect_column_values_to_be_between", {"column": "height", "min_value": lo, "max_value": hi, **ok}),
        ("expect_column_values_to_be_in_set", {"column": "mode", "value_set": list(MODES), **ok}),
        ("expect_column_values_to_be_between", {"column": "class_images", "min_value": v.min_per_class}),
        ("expect_column_values_to_match_regex", {"column": "sha256", "regex": r"^[0-9a-f]{64}$"}),
    ]


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


# ----------------------------------------------------------------------------- learner parts

def pixels(processor: dict, df: pd.DataFrame) -> np.ndarray:
    """uint8 (N, C, H, W) for the rows, in the processor's mode and size."""
    from coursepipe.vision.images import decode_many
    return decode_many(df["image"], processor["mode"], tuple(processor["size"]), processor["resize"])


def fit_processor(train: pd.DataFrame, model: ModelConfig) -> dict:
    """Classes, declared input (mode, size, resize), normalisation stats, and what was converted."""
    from coursepipe.vision.images import normalisation

    proc = {"classes": list(CLASSES), "mode": model.mode, "size": list(model.size),
            "resize": model.resize, "normalize": model.normalize}
    mean, std = normalisation(model.normalize, pixels(proc, train))
    modes = train["mode"].value_counts().sort_index()
    return {**proc, "mean": mean, "std": std, "target": TARGET,
            # the declared conversion rule, recorded: how many training images came in each mode
            "source_modes": {str(k): int(v) for k, v in modes.items()},
            "converted": int((train["mode"] != model.mode).sum())}


def tensors(processor: dict, df: pd.DataFrame):
    """(x uint8 (N, C, H, W), y int64) for the rows."""
    import torch

    index = {c: i for i, c in enumerate(processor["classes"])}
    y = df[TARGET].map(index)
    if y.isna().any():
        raise ValueError(f"labels outside the classes: {sorted(set(df[TARGET][y.isna()]))[:5]}")
    return torch.from_numpy(pixels(processor, df)), torch.tensor(y.to_numpy(np.int64))


def build_model(processor: dict, model: ModelConfig):
    from coursepipe.models.vision import build
    from coursepipe.vision.images import CHANNELS
    return build(model.arch, CHANNELS[processor["mode"]], len(processor["classes"]),
                 tuple(processor["size"]), processor["mean"], processor["std"],
                 model.widths, model.hidden)


def splitter(model):
    return [list(model.parameters())]


def loss_func():
    import torch
    return torch.nn.CrossEntropyLoss()


def metrics() -> dict:
    from coursepipe.learn.loop import accuracy
    return {"accuracy": accuracy}


def callbacks(cfg) -> list:
    """Batch augmentation on the training rows, seeded by train.seed and the step."""
    from coursepipe.vision.augment import AugmentBatch
    aug = augmentation(cfg.model)
    return [AugmentBatch(aug, cfg.train.seed)] if aug.active else []


def evaluate(model, recipe, processor: dict, valid: pd.DataFrame, bs: int, plots: Path, cfg):
    """Accuracy / error rate, confusion matrix, most-confused pairs, top-losses grid."""
    from coursepipe.vision.evaluate import evaluate_images
    return evaluate_images(model, recipe, processor, valid, bs, plots, cfg, cfg.model.top_losses)
