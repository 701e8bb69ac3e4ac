"""planet (lesson 3): multi-label classification of satellite chips, F2 at threshold 0.2.

`prepare.layout` picks how images are tagged:
- `csv`: fastai's from_csv with a label delimiter, Kaggle planet's layout by default:
  `planet/train_v2.csv` with `image_name,tags` (tags space-separated) and the images in
  `planet/train-jpg/<image_name>.jpg` (`prepare.csv`: file, folder, suffix, columns, delimiter,
  vocabulary, optional true/false valid column). Any CSV of file and tags fits (lesson 2's
  layout of own_images, tags joined by `label_delim`).
- `coco`: a COCO annotation file (fastai's coco_tiny: `coco_tiny/train.json` and
  `coco_tiny/train/*.jpg`); an image's tags are the categories of its boxes (spaces in a
  category name become '_'), its vocabulary the file's categories.
Every row is checked before an image is read: a file the labels name but the archive lacks, an
empty tag cell, a tag outside the vocabulary each stop prepare naming the row and the file.
Seeded random split (prepare.valid_pct) unless the CSV has a valid column. The multi-label kind
(coursepipe/kinds/multi_label.py) does the rest. Course result: F2 0.931 (ResNet-50, 128 then 256 px).

The offline sample is SYNTHETIC (a SYNTHETIC.txt says so) in Kaggle's layout with planet's own tag
names and a known rule: one weather tag per image (clear; haze = washed out towards grey;
partly_cloudy = white blobs over part of it; cloudy = mostly white, and then no other tag, as in
planet), and independently per land tag a drawn feature: primary = a green textured ground
(else brown bare ground), water = a blue river band, road = a thin grey line, agriculture = a
yellow rectangle, habitation = a cluster of small dark-red squares.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from coursepipe.config import ConfigError, Section
from coursepipe.contract import Recipe, Schema
from coursepipe.data.archive import deterministic_tgz
from coursepipe.data.csvfile import DataError
from coursepipe.kinds.image import ImagePrepare, manifest_table
from coursepipe.kinds.multi_label import TAGS, MultiLabelClassification, MultiLabelNet, \
    parse_tags, unknown_tags
from coursepipe.vision.layouts import read_label_csv
from coursepipe.vision.synthetic import encode

# the 17 tags of Kaggle's planet-understanding-the-amazon-from-space train_v2.csv
PLANET_TAGS = ("agriculture", "artisinal_mine", "bare_ground", "blooming", "blow_down", "clear", "cloudy",
               "conventional_mine", "cultivation", "habitation", "haze", "partly_cloudy", "primary", "road",
               "selective_logging", "slash_burn", "water")
WEATHER = ("clear", "haze", "partly_cloudy", "cloudy")
LAND = ("primary", "water", "road", "agriculture", "habitation")
SYNTHETIC_ROOT = "planet"
COLUMNS = ("path", "tags", "width", "height", "mode", "decodable", "decode_error", "sha256",
           "excluded", "duplicate", "tag_images", "layout_split", "image")
PATH_REGEX = r"^[^/.][^/]*(/[^/]+)+$"  # a relative path inside the archive, at least <dir>/<file>


@dataclass(frozen=True)
class CsvLayout(Section):
    """fastai from_csv(path, csv, folder=, suffix=, label_delim=): files relative to the CSV's folder."""
    file: str                           # the label CSV, relative to the archive root
    folder: str                         # images folder, relative to the CSV's folder ('' = beside it)
    suffix: str                         # appended to each file cell (planet's image_name has none)
    columns: tuple[str, str]            # [file column, tags column]
    label_delim: str                    # between tags in a cell (planet: a space)
    vocabulary: tuple[str, ...]         # allowed tags; one outside stops prepare naming the file ([] = any)
    valid_column: str | None = None     # a true/false column fixing the split (None: seeded random)

    def __post_init__(self):
        if not self.label_delim:
            raise ConfigError("label_delim must not be empty")
        bad = [t for t in self.vocabulary if not t or any(c.isspace() for c in t)]
        if bad:
            raise ConfigError(f"vocabulary: tags must be non-empty and hold no spaces, got {bad}")


@dataclass(frozen=True)
class CocoLayout(Section):
    """A COCO annotation file: images[].file_name, annotations[].category_id, categories[].name."""
    file: str                           # the JSON, relative to the archive root
    folder: str                         # images folder, relative to the JSON's folder


@dataclass(frozen=True)
class PlanetPrepare(ImagePrepare):
    """The image kind's policies plus the layout that tags the images."""
    layout: Literal["csv", "coco"]
    csv: CsvLayout
    coco: CocoLayout


# ----------------------------------------------------------------------------- layouts

def tag_cells(cells: list[str], files: list[Path], root: Path, where: str, delim: str) -> list[str]:
    """Label cells -> the prepared `tags` strings; a tag holding a space is an error naming the row."""
    out = []
    for i, (cell, f) in enumerate(zip(cells, files), start=1):
        tags = parse_tags(cell, delim)
        spaced = [t for t in tags if any(c.isspace() for c in t)]
        if spaced:
            raise DataError(f"{where}: row {i} ({f.relative_to(root).as_posix()}): tag(s) {spaced} hold "
                            f"a space; set prepare.csv.label_delim to the delimiter between tags")
        out.append(" ".join(tags))
    return out


def check_vocabulary(df: pd.DataFrame, vocabulary, where: str) -> None:
    unknown = unknown_tags(df[TAGS], df["path"], vocabulary) if vocabulary else []
    if unknown:
        raise DataError(f"{where}: {len(unknown)} tag(s) not in the vocabulary "
                        f"{list(vocabulary)}: {'; '.join(unknown[:20])}")


def from_csv(extracted: Path, c: CsvLayout) -> pd.DataFrame:
    root = extracted.resolve()
    rows = read_label_csv(extracted, c.file, c.columns, c.valid_column, c.folder, c.suffix)
    tags = tag_cells(rows.labels, rows.files, root, c.file, c.label_delim)
    df = manifest_table(list(zip(rows.files, tags)), root).rename(columns={"label": TAGS})
    df["layout_split"] = rows.layout_split
    check_vocabulary(df, c.vocabulary, f"{c.file} (prepare.csv.vocabulary)")
    return df


def from_coco(extracted: Path, c: CocoLayout) -> pd.DataFrame:
    """Tags = the categories of each image's annotations (an image without any is an error)."""
    path, root = (extracted / c.file).resolve(), extracted.resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise FileNotFoundError(f"layout coco: {c.file} is not a file inside the archive")
    try:
        data = json.loads(path.read_text())
        names = {cat["id"]: "_".join(str(cat["name"]).split()) for cat in data["categories"]}
        images = {im["id"]: im["file_name"] for im in data["images"]}
        boxes = [(a["image_id"], a["category_id"]) for a in data["annotations"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{c.file}: not a COCO annotation file ({type(e).__name__}: {e})") from None
    tags: dict = {i: set() for i in images}
    for n, (image, category) in enumerate(boxes):
        if image not in images:
            raise DataError(f"{c.file}: annotations[{n}] names image_id {image}, which is not in images")
        if category not in names:
            raise DataError(f"{c.file}: annotations[{n}] ({images[image]}) has category_id {category}, "
                            f"which is not in categories (the vocabulary: {sorted(names.values())})")
        tags[image].add(names[category])
    base, files = (path.parent / c.folder).resolve(), []
    for image, name in images.items():
        f = (base / name).resolve()
        if not f.is_relative_to(root):
            raise DataError(f"{c.file}: image {image}: {name!r} points outside the archive")
        if not f.is_file():
            raise DataError(f"{c.file}: image {image}: {f.relative_to(root).as_posix()} is not a file in the archive")
        if not tags[image]:
            raise DataError(f"{c.file}: image {image} ({name}) has no annotations, so no tags")
        files.append((f, " ".join(sorted(tags[image]))))
    df = manifest_table(files, root).rename(columns={"label": TAGS})
    df["layout_split"] = ""
    return df


def read_raw(extracted: Path, p: PlanetPrepare) -> pd.DataFrame:
    """The manifest of the layout's images with their tags (and fixed split, if any)."""
    return from_coco(extracted, p.coco) if p.layout == "coco" else from_csv(extracted, p.csv)


def split(df: pd.DataFrame, p: PlanetPrepare) -> np.ndarray | None:
    """A CSV's valid column; None: the seeded random split."""
    if (df["layout_split"] == "").all():
        return None
    return (df["layout_split"] == "valid").to_numpy()


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """The manifest's columns in the schema's order (tag_images is filled by the kind's prepare)."""
    return df.assign(tag_images=0)[list(COLUMNS)]


# ----------------------------------------------------------------------------- synthetic sample

def synthetic_tags(rng: np.random.Generator) -> list[str]:
    """One weather tag; unless cloudy, each land tag with probability 0.45 (primary 0.7)."""
    weather = WEATHER[int(rng.choice(4, p=[0.55, 0.15, 0.15, 0.15]))]
    if weather == "cloudy":
        return [weather]
    land = [t for t in LAND if rng.random() < (0.7 if t == "primary" else 0.45)]
    return [weather, *land]


def planet_image(tags: list[str], rng: np.random.Generator, side: int = 64):
    """A 64 px chip drawn by the rule in the module docstring."""
    from PIL import Image, ImageDraw, ImageFilter

    ground = (40, 120, 50) if "primary" in tags else (150, 115, 80)
    arr = np.clip(np.array(ground)[None, None] + rng.normal(0, 22, (side, side, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(im)
    if "water" in tags:  # a river band across the chip
        y0, y1 = rng.uniform(0, side, 2)
        draw.line([(0, y0), (side, y1)], fill=(40, 70, 170), width=int(rng.integers(6, 11)))
    if "agriculture" in tags:
        x, y = rng.uniform(2, side / 2, 2)
        w, h = rng.uniform(side / 4, side / 2.2, 2)
        draw.rectangle((x, y, x + w, y + h), fill=(215, 200, 90))
    if "road" in tags:
        x0, x1 = rng.uniform(0, side, 2)
        draw.line([(x0, 0), (x1, side)], fill=(170, 170, 170), width=2)
    if "habitation" in tags:
        cx, cy = rng.uniform(side / 4, 3 * side / 4, 2)
        for _ in range(6):
            dx, dy = rng.uniform(-9, 9, 2)
            draw.rectangle((cx + dx, cy + dy, cx + dx + 3, cy + dy + 3), fill=(120, 30, 30))
    if tags[0] in ("partly_cloudy", "cloudy"):
        clouds = Image.new("L", (side, side), 0)
        cd = ImageDraw.Draw(clouds)
        for _ in range(2 if tags[0] == "partly_cloudy" else 9):
            cx, cy = rng.uniform(0, side, 2)
            r = rng.uniform(side / 8, side / 4) if tags[0] == "partly_cloudy" else rng.uniform(side / 3, side / 2)
            cd.ellipse((cx - r, cy - r, cx + r, cy + r), fill=230)
        # textured white (a real cloud deck is not one grey level: the bad-image policy would drop it)
        white = np.clip(232 + rng.normal(0, 14, (side, side, 1)), 0, 255).repeat(3, 2).astype(np.uint8)
        im = Image.composite(Image.fromarray(white, "RGB"), im, clouds.filter(ImageFilter.GaussianBlur(3)))
    elif tags[0] == "haze":
        im = Image.blend(im, Image.new("RGB", (side, side), (190, 190, 195)), 0.55)
    return im


def synthesize(rows: int | None = None, seed: int = 0) -> bytes:
    """A SYNTHETIC Kaggle-layout archive: planet/train_v2.csv (image_name,tags) and
    planet/train-jpg/train_<n>.jpg, 64 px JPEGs whose tags follow the rule above."""
    rows = rows or 400
    rng = np.random.default_rng(seed)
    files, lines = {}, ["image_name,tags"]
    for i in range(rows):
        tags = synthetic_tags(rng)
        files[f"{SYNTHETIC_ROOT}/train-jpg/train_{i}.jpg"] = encode(planet_image(tags, rng), "JPEG")
        lines.append(f"train_{i},{' '.join(tags)}")
    files[f"{SYNTHETIC_ROOT}/train_v2.csv"] = ("\n".join(lines) + "\n").encode()
    files[f"{SYNTHETIC_ROOT}/SYNTHETIC.txt"] = (b"Generated by coursepipe: drawn planet-like chips whose tags "
                                                b"follow a known rule (coursepipe/recipes/planet.py), not "
                                                b"satellite images.\n")
    return deterministic_tgz(files)


RECIPE = Recipe(
    name="planet",
    course=("fbeta", 0.931, "lesson 3, planet, F2 at threshold 0.2, ResNet-50 at 256 px"),
    kind=MultiLabelClassification(),
    schema=Schema(columns=COLUMNS, target=TAGS, patterns={"path": PATH_REGEX}),
    model_config=MultiLabelNet,
    prepare_config=PlanetPrepare,
    synthesize=synthesize,
    read_raw=read_raw,
    normalise=normalise,
    split=split,
)
