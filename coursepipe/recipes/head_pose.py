"""head_pose (lesson 3): regress the centre of a head in BIWI's Kinect frames, one point per image.

Layout (fastai URLs.BIWI_HEAD_POSE): biwi_head_pose/<nn>/frame_XXXXX_rgb.jpg with its
frame_XXXXX_pose.txt (3 rotation rows, then the head centre x y z in mm) and, per person folder
<nn>, the camera's rgb.cal. The target is the lesson's: the centre projected with the folder's
intrinsics (`convert_biwi`, coursepipe/vision/points.py). A pose file that does not parse, or a
folder without its rgb.cal, stops prepare naming the file. Validation = one person's folder
(`prepare.valid_folder`; the course holds out 13), so the model is scored on a face it never saw.
Course result: valid MSE 0.0028 in [-1, 1] units (ResNet-34 at 160x120).

The offline sample is SYNTHETIC, in the same layout: per "person" a calibration, a room and a
head-like shape (an ellipse face with hair and eyes over a torso) drawn at the projection of a
known 3-D centre, written with a pose file whose rotation rows are a small random rotation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.config import ConfigError, Prepare
from coursepipe.contract import Recipe, Schema
from coursepipe.data.archive import deterministic_tgz
from coursepipe.data.csvfile import DataError
from coursepipe.kinds.points import PointNet, PointRegression

ROOT = "biwi_head_pose"
FRAME_GLOB = "frame_*_rgb.jpg"
COLUMNS = ("path", "person", "pose_file", "width", "height", "mode", "decodable", "decode_error",
           "sha256", "x", "y", "problem", "image")
PATH_REGEX = rf"^{ROOT}/[^/]+/frame_\d+_rgb\.jpg$"
MAX_LISTED = 5          # bad files quoted in one error


@dataclass(frozen=True)
class BiwiPrepare(Prepare):
    """The base prepare section plus the held-out person (valid_pct is unused: the split is fixed)."""
    valid_folder: str                   # the person folder scored as validation (the course: 13)

    def __post_init__(self):
        super().__post_init__()
        if not self.valid_folder or "/" in self.valid_folder:
            raise ConfigError(f"valid_folder: expected a folder name like '13', got {self.valid_folder!r}")


# ----------------------------------------------------------------------------- reading the layout

def pose_file(frame: Path) -> Path:
    """frame_00003_rgb.jpg -> frame_00003_pose.txt (the lesson's img2txt_name)."""
    return frame.with_name(frame.name[: -len("rgb.jpg")] + "pose.txt")


def points(frames: list[Path]) -> tuple[list[tuple[float, float]], list[str]]:
    """Each frame's projected head centre; every unreadable rgb.cal or pose file is named."""
    from coursepipe.vision.points import convert_biwi, read_calibration, read_centre

    cals: dict[Path, np.ndarray | None] = {}
    out, errors = [], []
    for frame in frames:
        folder = frame.parent
        if folder not in cals:
            try:
                cals[folder] = read_calibration(folder / "rgb.cal")
            except DataError as e:
                cals[folder] = None
                errors.append(str(e))
        try:
            centre = read_centre(pose_file(frame))
        except DataError as e:
            errors.append(str(e))
            centre = None
        out.append(convert_biwi(centre, cals[folder]) if centre is not None and cals[folder] is not None
                   else (np.nan, np.nan))
    return out, errors


def read_raw(extracted: Path, p: BiwiPrepare) -> pd.DataFrame:
    """The manifest of every biwi_head_pose/<person>/frame_*_rgb.jpg with its projected point."""
    from coursepipe.vision.manifest import manifest

    root = extracted / ROOT
    if not root.is_dir():
        top = sorted(f.name for f in extracted.iterdir())[:5]
        raise FileNotFoundError(f"archive has no {ROOT}/ folder (top level: {top or 'empty'})")
    frames = sorted(root.glob(f"*/{FRAME_GLOB}"))
    if not frames:
        raise FileNotFoundError(f"{ROOT}/ holds no <person>/{FRAME_GLOB} files")
    xy, errors = points(frames)
    if errors:
        rel = [e.replace(f"{extracted}/", "") for e in errors]  # name files as the archive does
        raise DataError(f"prepare@head_pose: {len(errors)} bad BIWI file(s): " + "; ".join(rel[:MAX_LISTED]))
    df = manifest([(f, "") for f in frames], extracted).drop(columns=["label"])
    df["person"] = [f.parent.name for f in frames]
    df["pose_file"] = [pose_file(f).relative_to(extracted).as_posix() for f in frames]
    df["x"], df["y"] = [a for a, _ in xy], [b for _, b in xy]
    df["problem"] = ""
    return df


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    return df[list(COLUMNS)]


def split(df: pd.DataFrame, p: BiwiPrepare) -> np.ndarray:
    """Validation = the frames of person `valid_folder`."""
    mask = (df["person"] == p.valid_folder).to_numpy()
    if not mask.any():
        raise ValueError(f"prepare@head_pose: prepare.valid_folder '{p.valid_folder}' is not among "
                         f"the person folders {sorted(df['person'].unique())}")
    return mask


# ----------------------------------------------------------------------------- the synthetic sample

PEOPLE = ("01", "02", "03", "04", "05", "13")   # 13: the course's held-out person
SIDE = (320, 240)                                # half BIWI's 640 x 480, so the sample stays small
FOCAL = 517.679 / 2                              # BIWI's RGB focal length (px) at half size
HEAD_MM = (80.0, 105.0)                          # half width / half height of the face, mm


def calibration_text(fx: float, fy: float, cx: float, cy: float) -> str:
    """An rgb.cal as BIWI writes it: intrinsics, distortion, rotation, translation, resolution."""
    return (f"{fx:.3f} 0 {cx:.3f} \n0 {fy:.3f} {cy:.3f} \n0 0 1 \n\n0 0 0 0 \n\n"
            "1 0 0 \n0 1 0 \n0 0 1 \n\n0 0 0 \n\n"
            f"{SIDE[0]} {SIDE[1]}\n")


def rotation(rng: np.random.Generator, max_deg: float = 20.0) -> np.ndarray:
    """A small random rotation (yaw, pitch, roll), as a pose file's first three rows."""
    a, b, c = np.radians(rng.uniform(-max_deg, max_deg, 3))
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def pose_text(rot: np.ndarray, centre: np.ndarray) -> str:
    rows = "".join(" ".join(f"{v:.6f}" for v in r) + " \n" for r in rot)
    return rows + "\n" + " ".join(f"{v:.3f}" for v in centre) + " \n"


def person_look(rng: np.random.Generator) -> dict:
    """Colours and room layout shared by one person's frames."""
    return {"skin": rng.integers([150, 100, 70], [240, 190, 160]), "hair": rng.integers(10, 90, 3),
            "shirt": rng.integers(20, 230, 3), "wall": rng.integers(60, 200, 3),
            "boxes": [(rng.integers(0, SIDE[0], 2), rng.integers(0, SIDE[1], 2), rng.integers(0, 256, 3))
                      for _ in range(4)]}


def frame_image(look: dict, xy: tuple[float, float], r: tuple[float, float], rng: np.random.Generator):
    """A SYNTHETIC frame: room, torso, hair, face ellipse centred on xy (pixels), eyes."""
    from PIL import Image, ImageDraw

    w, h = SIDE
    arr = np.clip(look["wall"][None, None] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    d = ImageDraw.Draw(im)
    for (x0, x1), (y0, y1), colour in look["boxes"]:   # furniture: fixed per person
        d.rectangle((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), fill=tuple(int(c) for c in colour))
    cx, cy = xy
    rx, ry = r
    d.ellipse((cx - 2.2 * rx, cy + 1.1 * ry, cx + 2.2 * rx, cy + 5 * ry), fill=tuple(int(c) for c in look["shirt"]))
    d.ellipse((cx - 1.08 * rx, cy - 1.15 * ry, cx + 1.08 * rx, cy + 0.6 * ry), fill=tuple(int(c) for c in look["hair"]))
    d.ellipse((cx - rx, cy - ry * 0.85, cx + rx, cy + ry), fill=tuple(int(c) for c in look["skin"]))
    eye = max(1.0, rx * 0.15)
    for side in (-1, 1):
        ex, ey = cx + side * rx * 0.4 + rng.normal(0, rx * 0.05), cy - ry * 0.1
        d.ellipse((ex - eye, ey - eye, ex + eye, ey + eye), fill=(30, 30, 30))
    return im


def synthesize(rows: int | None = None, seed: int = 0) -> bytes:
    """A SYNTHETIC biwi_head_pose/ archive: len(PEOPLE) person folders, each with its rgb.cal and
    frames whose head is drawn at the projection of the centre its pose file gives."""
    from coursepipe.vision.points import convert_biwi
    from coursepipe.vision.synthetic import encode

    rows = rows or 360
    rng = np.random.default_rng(seed)
    files = {f"{ROOT}/SYNTHETIC.txt": b"Generated by coursepipe: drawn heads at known 3-D positions "
                                      b"projected with each folder's rgb.cal, not BIWI recordings.\n"}
    for k, person in enumerate(PEOPLE):
        fx = FOCAL * rng.uniform(0.95, 1.05)
        cal_text = calibration_text(fx, fx, SIDE[0] / 2 + rng.uniform(-4, 4), SIDE[1] / 2 + rng.uniform(-4, 4))
        files[f"{ROOT}/{person}/rgb.cal"] = cal_text.encode()
        cal = np.array([[float(v) for v in line.split()] for line in cal_text.splitlines()[:3]])
        look = person_look(rng)
        for i in range(k, rows, len(PEOPLE)):   # rows spread over the people
            centre = np.array([rng.uniform(-260, 260), rng.uniform(-170, 170), rng.uniform(850, 1300)])
            xy = convert_biwi(centre, cal)
            radius = (HEAD_MM[0] * cal[0, 0] / centre[2], HEAD_MM[1] * cal[1, 1] / centre[2])
            stem = f"{ROOT}/{person}/frame_{i:05d}"
            files[f"{stem}_rgb.jpg"] = encode(frame_image(look, xy, radius, rng), "JPEG")
            files[f"{stem}_pose.txt"] = pose_text(rotation(rng), centre).encode()
    return deterministic_tgz(files)


RECIPE = Recipe(
    name="head_pose",
    course=("mse", 0.0028, "lesson 3, valid MSE in [-1, 1] units, ResNet-34 at 160x120, person 13 held out"),
    kind=PointRegression(),
    schema=Schema(columns=COLUMNS, target="x", patterns={"path": PATH_REGEX}),
    model_config=PointNet,
    prepare_config=BiwiPrepare,
    synthesize=synthesize,
    read_raw=read_raw,
    normalise=normalise,
    split=split,
)
