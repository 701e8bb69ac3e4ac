"""own_images (lesson 2): your own image classifier, a folder per class, by transfer learning.

Layout: <root>/<class>/*.jpg|png (lesson 2's bears: bears/{black,grizzly,teddys}/...). The
prepared table is the image manifest (coursepipe/vision/manifest.py) plus the declared bad-image
policy's verdict per file (`excluded`: '' or why, naming the file), as lesson 2's verify_images:
with `bad_images: exclude` unreadable or too small images (< model.min_size px) are kept in the
table, listed in the prepare output and the validation report, and never trained on (they are
put on the training side of the split, and tensors() skips them); `error` stops prepare naming them.
Model: torchvision ResNet + fastai head (coursepipe/models/transfer.py), fine_tune from
`model.weights`. Course result: error 0.027 (bears, ResNet-34 from ImageNet).

pets (recipes/pets.py) reuses everything here except how a file gets its label.
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
SYNTHETIC_ROOT = "shapes"             # the synthetic sample's <root>
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16")  # source modes converted to RGB

# validation schema (coursepipe/validation/suites.py); classes come from the data, so no CLASSES
TARGET = "label"
COLUMNS = ("path", "label", "width", "height", "mode", "decodable", "decode_error", "sha256",
           "excluded", "duplicate", "class_images", "image")
CATEGORIES: dict[str, tuple] = {}
RANGES: dict[str, tuple[float, float]] = {}
PATH_REGEX = r"^[^/]+/[^/]+/[^/]+$"   # <root>/<class>/<file>
OK = 'excluded==""'                    # GX row condition: the rows the policy keeps


@dataclass(frozen=True)
class ModelConfig:
    """Input, bad-image policy, backbone, head, pretrained weights and augmentation (flat)."""
    arch: str = "resnet34"                # resnet18 | resnet34 | resnet50 (torchvision)
    weights: str = "none"                 # none | http(s)/file URL | local file (state_dict / backbone.pt / model.pt)
    weights_sha256: str | None = None     # URL: defaults to torchvision's hash prefix in the file name
    weights_cache: str = "~/.cache/coursepipe/weights"  # downloaded weight files, kept once verified
    lin_ftrs: tuple[int, ...] = (512,)    # fastai create_head hidden layers
    ps: float = 0.5                       # head dropout (earlier layers ps / 2)
    size: tuple[int, int] = (224, 224)    # width, height fed to the model
    resize: str = "crop"                  # crop (short side, centre crop) | squish
    normalize: str = "imagenet"           # imagenet (a pretrained backbone's stats) | data | none
    bad_images: str = "exclude"           # exclude (listed, not trained on) | error (prepare stops)
    min_size: int = 32                    # an image whose shorter side is below this is bad, px
    flip: bool = True                     # fastai get_transforms defaults below
    max_rotate: float = 10.0              # degrees
    max_zoom: float = 1.1
    max_translate: float = 0.0            # fraction of the side
    max_warp: float = 0.2
    p_affine: float = 0.75
    max_lighting: float = 0.2
    p_lighting: float = 0.75
    top_losses: int = 9                   # evaluate: images in the top-losses grid

    def __post_init__(self):
        from coursepipe.config import ConfigError
        from coursepipe.models.transfer import ARCHS

        choices = {"arch": tuple(ARCHS), "resize": ("crop", "squish"),
                   "normalize": ("imagenet", "data", "none"), "bad_images": ("exclude", "error")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}: {getattr(self, name)!r} is not one of {list(allowed)}")
        if min(self.size) < 1 or self.min_size < 1:
            raise ConfigError(f"size and min_size must be positive, got {self.size}, {self.min_size}")
        if not 0.0 <= self.ps < 1.0:
            raise ConfigError(f"ps must be in [0, 1), got {self.ps}")
        if self.max_zoom < 1:
            raise ConfigError(f"max_zoom must be >= 1, got {self.max_zoom}")


def augmentation(m):
    from coursepipe.vision.augment import Augment
    return Augment(flip=m.flip, max_rotate=m.max_rotate, max_zoom=m.max_zoom,
                   max_translate=m.max_translate, max_warp=m.max_warp, p_affine=m.p_affine,
                   max_lighting=m.max_lighting, p_lighting=m.p_lighting)


# ----------------------------------------------------------------------------- raw data

def read_raw(extracted: Path) -> pd.DataFrame:
    """The manifest of every image file; its label is its folder's name."""
    from coursepipe.vision.manifest import image_files, manifest

    files = image_files(extracted)
    if not files:
        top = sorted(p.name for p in extracted.iterdir())[:5]
        raise FileNotFoundError(f"archive holds no image files (top level: {top or 'empty'}); "
                                f"expected <root>/<class>/*.jpg|png")
    return manifest([(p, p.parent.name) for p in files], extracted)


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Manifest + the policy columns; split() fills them in, as only it sees the params."""
    out = df.copy()
    out["excluded"] = out["decode_error"]  # an unreadable file is never usable, whatever the policy
    out["duplicate"] = ""
    out["class_images"] = 0
    return out[list(COLUMNS)]


def bad_reasons(df: pd.DataFrame, min_size: int) -> pd.Series:
    """Per row: '' or why the file is bad (unreadable, or shorter side below min_size), naming it."""
    small = df["decodable"] & (np.minimum(df["width"], df["height"]) < min_size)
    sizes = df["path"] + ": too small (" + df["width"].astype(str) + "x" + df["height"].astype(str) \
        + f" < min_size {min_size})"
    out = df["excluded"].copy()
    return out.mask((out == "") & small, sizes)


def apply_policy(df: pd.DataFrame, cfg, reasons: pd.Series) -> np.ndarray:
    """Record the policy's verdict and the split-dependent checks in df (prepare writes this frame);
    return the validation mask: a seeded random valid_pct of the usable rows."""
    from coursepipe.stages.prepare import split_mask
    from coursepipe.vision.manifest import cross_split_duplicates

    bad = reasons != ""
    policy = cfg.model.bad_images
    listed = "; ".join(reasons[bad].head(20))
    if bad.any() and policy == "error":
        raise ValueError(f"prepare@{cfg.name}: {int(bad.sum())} bad images (model.bad_images: error): "
                         f"{listed}")
    usable = np.flatnonzero(~bad.to_numpy())
    if len(usable) == 0:
        raise ValueError(f"prepare@{cfg.name}: no usable images among {len(df)} files: {listed}")
    mask = np.zeros(len(df), dtype=bool)
    mask[usable[split_mask(len(usable), cfg.prepare.valid_pct, cfg.prepare.seed)]] = True
    df["excluded"] = reasons.to_numpy()
    df["duplicate"] = cross_split_duplicates(df["sha256"], df["path"], pd.Series(mask, index=df.index))
    # per row: training images of its class among the usable rows (a valid-only class shows 0)
    counts = df.loc[~bad & ~mask, TARGET].value_counts()
    df["class_images"] = df[TARGET].map(counts).fillna(0).astype("int64")
    if bad.any():
        print(f"prepare@{cfg.name}: excluded {int(bad.sum())} of {len(df)} images "
              f"(model.bad_images: exclude; listed in the table's `excluded` column): {listed}")
    return mask


def split(df: pd.DataFrame, cfg) -> np.ndarray:
    """The bad-image policy, then a seeded random split of the usable images."""
    return apply_policy(df, cfg, bad_reasons(df, cfg.model.min_size))


def extra_expectations(v, path_regex: str = PATH_REGEX) -> list:
    """Readable files of allowed size and mode in the layout, enough training images per class,
    no cross-split copies; the excluded files are reported (count and names), not failed on."""
    lo, hi = v.image_side
    ok = {"row_condition": OK, "condition_parser": "pandas"}
    return [
        ("expect_column_values_to_match_regex", {"column": "path", "regex": path_regex}),
        # the policy's report: always passes (mostly 0), lists the excluded files and their count
        ("expect_column_values_to_be_in_set", {"column": "excluded", "value_set": [""], "mostly": 0.0}),
        ("expect_column_values_to_be_in_set", {"column": "decodable", "value_set": [True], **ok}),
        ("expect_column_values_to_be_in_set", {"column": "duplicate", "value_set": [""]}),
        ("expect_column_values_to_be_between", {"column": "width", "min_value": lo, "max_value": hi, **ok}),
        ("expect_column_values_to_be_between", {"column": "height", "min_value": lo, "max_value": hi, **ok}),
        ("expect_column_values_to_be_in_set", {"column": "mode", "value_set": list(MODES), **ok}),
        ("expect_column_values_to_be_between", {"column": "class_images", "min_value": v.min_per_class, **ok}),
        ("expect_column_values_to_match_regex", {"column": "sha256", "regex": r"^[0-9a-f]{64}$"}),
    ]


# ----------------------------------------------------------------------------- synthetic sample

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 200), "yellow": (220, 200, 40)}


def shape_image(shape: str, colour: tuple[int, int, int], rng: np.random.Generator, side: int = 64):
    """A jittered filled shape in `colour` (tinted per image) on a noisy random background."""
    from PIL import Image, ImageDraw

    bg = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (side, side, 3))
    arr = np.clip(bg[None, None] * 0.6 + 50 + noise, 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(im)
    r = side * rng.uniform(0.22, 0.38)
    cx, cy = side / 2 + rng.uniform(-side / 8, side / 8, 2)
    fill = tuple(int(np.clip(c + rng.integers(-30, 31), 0, 255)) for c in colour)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        w = r / 3
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    return im.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)


def encode(im, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def synthesize(rows: int | None = None, seed: int = 0) -> bytes:
    """A SYNTHETIC <root>/<class>/ archive: shapes/{circle,square,triangle,cross}/synthetic_<n>.(jpg|png),
    64 px, random colours (the class is the shape), alternating JPEG and PNG."""
    rows = rows or 400
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(rows):
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
        fmt, ext = (("JPEG", "jpg"), ("PNG", "png"))[(i // len(SHAPES)) % 2]
        files[f"{SYNTHETIC_ROOT}/{shape}/synthetic_{i:05d}.{ext}"] = encode(shape_image(shape, colour, rng), fmt)
    files[f"{SYNTHETIC_ROOT}/SYNTHETIC.txt"] = b"Generated by coursepipe: coloured shapes, not photos.\n"
    return deterministic_tgz(files)


# ----------------------------------------------------------------------------- learner parts

def usable(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the bad-image policy keeps."""
    return df[df["excluded"] == ""] if "excluded" in df.columns else df


def pixels(processor: dict, df: pd.DataFrame) -> np.ndarray:
    from coursepipe.vision.images import decode_many
    return decode_many(df["image"], processor["mode"], tuple(processor["size"]), processor["resize"])


def fit_processor(train: pd.DataFrame, model) -> dict:
    """Classes (from the usable training rows), declared input, normalisation stats."""
    from coursepipe.vision.images import normalisation

    train = usable(train)
    proc = {"classes": sorted(train[TARGET].unique().tolist()), "mode": "RGB",
            "size": list(model.size), "resize": model.resize, "normalize": model.normalize}
    # only the data's own statistics need the pixels decoded
    x = pixels(proc, train) if model.normalize == "data" else np.zeros((1, 3, 1, 1), np.uint8)
    mean, std = normalisation(model.normalize, x)
    modes = train["mode"].value_counts().sort_index()
    return {**proc, "mean": mean, "std": std, "target": TARGET,
            "source_modes": {str(k): int(v) for k, v in modes.items()},
            "converted": int((train["mode"] != "RGB").sum())}


def tensors(processor: dict, df: pd.DataFrame):
    """(x uint8 (N, 3, H, W), y int64) for the usable rows."""
    import torch

    df = usable(df)
    index = {c: i for i, c in enumerate(processor["classes"])}
    y = df[TARGET].map(index)
    if y.isna().any():
        raise ValueError(f"labels outside the training classes: {sorted(set(df[TARGET][y.isna()]))[:5]}")
    return torch.from_numpy(pixels(processor, df)), torch.tensor(y.to_numpy(np.int64))


def build_model(processor: dict, model):
    from coursepipe.models.transfer import TransferNet
    return TransferNet(model.arch, len(processor["classes"]), processor["mean"], processor["std"],
                       model.lin_ftrs, model.ps)


def splitter(model):
    from coursepipe.models.transfer import splitter as resnet_split
    return resnet_split(model)


def loss_func():
    import torch
    return torch.nn.CrossEntropyLoss()


def metrics() -> dict:
    from coursepipe.learn.loop import accuracy
    return {"accuracy": accuracy}


def prefetch(cfg) -> None:
    """On the driver, before Ray starts: fetch and hash-check the pretrained weights once, so a
    bad URL or hash is one clear error line instead of a worker failure."""
    from coursepipe.models.transfer import resolve

    m = cfg.model
    resolve(m.weights, m.weights_cache, m.weights_sha256)


def callbacks(cfg) -> list:
    """Pretrained backbone weights (fresh runs), then seeded batch augmentation on training rows."""
    from coursepipe.models.transfer import LoadPretrained
    from coursepipe.vision.augment import AugmentBatch

    m = cfg.model
    cbs: list = []
    if m.weights not in ("", "none"):
        cbs.append(LoadPretrained(m.weights, m.weights_cache, m.weights_sha256))
    aug = augmentation(m)
    if aug.active:
        cbs.append(AugmentBatch(aug, cfg.train.seed))
    return cbs


def evaluate(model, recipe, processor: dict, valid: pd.DataFrame, bs: int, plots: Path, cfg):
    """Accuracy / error rate, confusion matrix, most-confused pairs, top-losses grid."""
    from coursepipe.vision.evaluate import evaluate_images
    return evaluate_images(model, recipe, processor, usable(valid).reset_index(drop=True), bs, plots,
                           cfg, cfg.model.top_losses)
