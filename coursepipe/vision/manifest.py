"""An image folder -> a manifest table: one row per file, checked and hashed, bytes kept.

The prepared table is this manifest, so the validate stage sees every file (corrupt, empty,
wrong folder, duplicated across splits) and training workers need no file access: each row
carries the file's own bytes (PNG/JPEG, compact) in the `image` column.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MANIFEST_COLUMNS = ("path", "label", "width", "height", "mode", "decodable", "decode_error",
                    "sha256", "image")


def image_files(root: Path) -> list[Path]:
    """Every image file under root (by suffix), sorted so the table order is reproducible."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def inspect_image(data: bytes, rel: str) -> dict:
    """width, height, mode, decodable and a decode error naming the file (empty when fine)."""
    from PIL import Image

    if not data:
        return {"width": 0, "height": 0, "mode": "", "decodable": False,
                "decode_error": f"{rel}: empty file (0 bytes)"}
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # the header alone can look fine on a truncated file
            return {"width": im.size[0], "height": im.size[1], "mode": im.mode, "decodable": True,
                    "decode_error": ""}
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        reason = " ".join(str(e).split()) or type(e).__name__
        return {"width": 0, "height": 0, "mode": "", "decodable": False,
                "decode_error": f"{rel}: cannot decode ({reason})"}


def flat_share(data: bytes, tolerance: int = 8) -> float:
    """The share of an image's pixels within `tolerance` grey levels of its median: 1.0 for a
    single colour, near 1 for a near-empty frame (a blank scan, a dot on white). Measured on a
    64 px greyscale thumbnail, so a 4k photo costs no more than a small one."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.draft("L", (64, 64))  # JPEG: decode at reduced scale
        grey = np.asarray(im.convert("L").resize((64, 64)), dtype=np.int16)
    return float((np.abs(grey - np.median(grey)) <= tolerance).mean())


def manifest_row(path: Path, root: Path, label: str) -> dict:
    """One file's manifest row; `path` is relative to the extracted archive's root."""
    data = path.read_bytes()
    rel = path.relative_to(root).as_posix()
    return {"path": rel, "label": label, **inspect_image(data, rel),
            "sha256": hashlib.sha256(data).hexdigest(), "image": data}


def manifest(files: list[tuple[Path, str]], root: Path) -> pd.DataFrame:
    """The manifest of (file, label) pairs, in the given order."""
    rows = [manifest_row(p, root, label) for p, label in files]
    df = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return df.astype({"width": "int64", "height": "int64", "decodable": bool})


def cross_split_duplicates(sha256: pd.Series, paths: pd.Series, valid: pd.Series) -> pd.Series:
    """Per row: '' or 'a.png = b.png' naming every file with the same bytes when the copies sit
    on both sides of the split (the same text on each of them, so a report counts it once)."""
    frame = pd.DataFrame({"sha": sha256.to_numpy(), "path": paths.to_numpy(),
                          "valid": valid.to_numpy(bool)})
    sides = frame.groupby("sha")["valid"].nunique()
    both = set(sides[sides > 1].index)
    out = pd.Series("", index=sha256.index, dtype=object)
    if not both:
        return out
    names = frame[frame["sha"].isin(both)].groupby("sha")["path"].agg(lambda p: " = ".join(sorted(p)))
    hit = frame["sha"].isin(both).to_numpy()
    out[hit] = frame.loc[hit, "sha"].map(names).to_numpy()
    return out


def images_per_class(label: pd.Series, group: pd.Series) -> pd.Series:
    """Per row: how many rows share its label within its group (split folder)."""
    return label.groupby([group, label]).transform("size").astype("int64")
