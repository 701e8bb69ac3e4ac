"""own_images (lesson 2): your own image classifier by transfer learning, in fastai's layouts.

`prepare.layout` picks how files are labelled and split, with any class names:
- `class_folders`: <root>/<class>/*.jpg|png (lesson 2's bears: bears/{black,grizzly,teddys}/...),
  label = folder name, seeded random split (fastai `from_folder(valid_pct=...)`);
- `train_valid`: <root>/<train>/<class>/* and <root>/<valid>/<class>/* (fastai
  `from_folder(train=, valid=)`; the folder names are `prepare.train_folder` / `valid_folder`);
- `csv`: a CSV of file and label (fastai `from_csv`): `prepare.csv_file` inside the archive, its
  `csv_columns` [file, label] with files relative to the CSV's folder, and optionally
  `csv_valid_column` (true/false per row) for a fixed split, else the seeded random one.
Grayscale or palette sources are converted to the model's mode (counted on the model card). The
image kind (coursepipe/kinds/image.py) does the rest: the declared bad-image policy (lesson 2's
verify_images, listed instead of deleted), pretrained EfficientNet-Lite0 + fastai head.
Course result: error 0.027 (bears, ResNet-34 from ImageNet).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from coursepipe.config import ConfigError
from coursepipe.contract import Recipe, Schema
from coursepipe.data.archive import deterministic_tgz
from coursepipe.kinds.image import TARGET, ImageClassification, ImagePrepare, PretrainedNet, manifest_table
from coursepipe.vision.layouts import read_label_csv
from coursepipe.vision.synthetic import COLOURS, SHAPES, encode, shape_image

SYNTHETIC_ROOT = "shapes"             # the synthetic sample's <root>

# validation schema (coursepipe/validation/suites.py); classes come from the data.
# layout_split: "train" / "valid" where the layout fixes the split, "" where it is random.
COLUMNS = ("path", "label", "width", "height", "mode", "decodable", "decode_error", "sha256",
           "excluded", "duplicate", "class_images", "layout_split", "image")
PATH_REGEX = r"^[^/.][^/]*(/[^/]+)+$"  # a relative path inside the archive, at least <dir>/<file>


@dataclass(frozen=True)
class OwnImagesPrepare(ImagePrepare):
    """The image kind's prepare section plus the layout of your folders."""
    layout: Literal["class_folders", "train_valid", "csv"]
    train_folder: str                   # train_valid: the training folder's name
    valid_folder: str                   # train_valid: the validation folder's name
    csv_file: str                       # csv: the label file, relative to the archive root
    csv_columns: tuple[str, str]        # csv: [file column, label column]
    csv_valid_column: str | None = None  # csv: a true/false column fixing the split (None: random)

    def __post_init__(self):
        super().__post_init__()
        if self.train_folder == self.valid_folder:
            raise ConfigError(f"train_folder and valid_folder are both {self.train_folder!r}")


def class_folders(extracted: Path, files: list[Path]) -> pd.DataFrame:
    df = manifest_table([(f, f.parent.name) for f in files], extracted)
    df["layout_split"] = ""
    return df


def train_valid(extracted: Path, files: list[Path], p: OwnImagesPrepare) -> pd.DataFrame:
    side = {p.train_folder: "train", p.valid_folder: "valid"}
    picked = [(f, side[f.parent.parent.name]) for f in files if f.parent.parent.name in side]
    if not any(s == "train" for _, s in picked) or not any(s == "valid" for _, s in picked):
        found = sorted({f.parent.parent.name for f in files})[:5]
        raise FileNotFoundError(f"layout train_valid: no images under <root>/{p.train_folder}/<class>/ "
                                f"and <root>/{p.valid_folder}/<class>/ (folders above the classes: {found})")
    df = manifest_table([(f, f.parent.name) for f, _ in picked], extracted)
    df["layout_split"] = [s for _, s in picked]
    return df


def from_csv(extracted: Path, p: OwnImagesPrepare) -> pd.DataFrame:
    """fastai's from_csv: coursepipe/vision/layouts.py reads and checks the rows (shared with planet)."""
    rows = read_label_csv(extracted, p.csv_file, p.csv_columns, p.csv_valid_column)
    df = manifest_table(list(zip(rows.files, rows.labels)), extracted.resolve())
    df["layout_split"] = rows.layout_split
    return df


def read_raw(extracted: Path, p: OwnImagesPrepare) -> pd.DataFrame:
    """The manifest of the layout's image files with their labels (and fixed split, if any)."""
    from coursepipe.vision.manifest import image_files

    if p.layout == "csv":
        return from_csv(extracted, p)
    files = image_files(extracted)
    if not files:
        top = sorted(f.name for f in extracted.iterdir())[:5]
        raise FileNotFoundError(f"archive holds no image files (top level: {top or 'empty'}); "
                                f"expected <root>/<class>/*.jpg|png")
    return train_valid(extracted, files, p) if p.layout == "train_valid" else class_folders(extracted, files)


def split(df: pd.DataFrame, p: OwnImagesPrepare) -> np.ndarray | None:
    """The layout's split (train_valid folders, a CSV's valid column); None: the seeded random one."""
    if (df["layout_split"] == "").all():
        return None
    return (df["layout_split"] == "valid").to_numpy()


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """The manifest's columns in the schema's order."""
    return df[list(COLUMNS)]


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


RECIPE = Recipe(
    name="own_images",
    course=("accuracy", 0.973, "lesson 2, bears, error 0.027"),
    kind=ImageClassification(),
    schema=Schema(columns=COLUMNS, target=TARGET, patterns={"path": PATH_REGEX}),
    model_config=PretrainedNet,
    prepare_config=OwnImagesPrepare,
    synthesize=synthesize,
    read_raw=read_raw,
    normalise=normalise,
    split=split,
)
