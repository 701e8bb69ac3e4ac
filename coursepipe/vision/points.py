"""Points on images (lesson 3's head pose): BIWI's calibration and pose files, the projection of a
3-D point to pixels, pixels <-> the [-1, 1] units the model learns in, and training augmentation
that moves the point with the image.

Coordinates are continuous: pixel (i, j) covers [i, i+1) x [j, j+1), so the image spans [0, W] x
[0, H] and unit = 2 * pixel / side - 1 (fastai v1's scaled ImagePoints). BIWI's principal point
(320, 240.5 on 640 x 480) is in this convention.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from coursepipe.data.csvfile import DataError
from coursepipe.learn.loop import Callback
from coursepipe.vision.augment import Augment, to_unit


# ----------------------------------------------------------------------------- BIWI files

def _genfromtxt(path: Path, **kwargs) -> np.ndarray:
    """np.genfromtxt as the lesson calls it, with its parse warnings and errors named by file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Empty input file" etc.: checked below instead
            return np.genfromtxt(path, **kwargs)
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot be parsed ({' '.join(str(e).split())[:200]})") from None


def read_calibration(path: Path) -> np.ndarray:
    """The RGB camera's 3x3 intrinsics from a BIWI rgb.cal, read as the lesson does
    (`np.genfromtxt(cal, skip_footer=6)`), checked: focal lengths > 0, last row [0, 0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: calibration file missing (every person folder holds its rgb.cal)")
    cal = _genfromtxt(path, skip_footer=6)
    if cal.shape != (3, 3) or not np.isfinite(cal).all() or cal[0, 0] <= 0 or cal[1, 1] <= 0 \
            or not np.allclose(cal[2], [0, 0, 1]):
        raise DataError(f"{path}: not a BIWI rgb.cal (expected a 3x3 intrinsics matrix "
                        f"[[fx 0 cx] [0 fy cy] [0 0 1]] before 6 lines of extrinsics; read "
                        f"{np.array2string(np.atleast_1d(cal), precision=3, separator=' ')})")
    return cal


def read_centre(path: Path) -> np.ndarray:
    """The head centre (x, y, z in mm, camera frame) from a BIWI frame_XXXXX_pose.txt: 3 rows of
    rotation, then the centre (`np.genfromtxt(pose, skip_header=3)`, as the lesson); z > 0."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: pose file missing (each frame_XXXXX_rgb.jpg needs its "
                        f"frame_XXXXX_pose.txt)")
    c = _genfromtxt(path, skip_header=3)
    if c.shape != (3,) or not np.isfinite(c).all() or c[2] <= 0:
        raise DataError(f"{path}: pose file unparsable (expected 3 rotation rows, then the head "
                        f"centre 'x y z' in mm with z > 0; read "
                        f"{np.array2string(np.atleast_1d(c), precision=3, separator=' ')})")
    return c


def convert_biwi(centre: np.ndarray, cal: np.ndarray) -> tuple[float, float]:
    """The lesson's convert_biwi: a 3-D centre projected by the intrinsics to (x, y) pixels."""
    x = centre[0] * cal[0][0] / centre[2] + cal[0][2]
    y = centre[1] * cal[1][1] / centre[2] + cal[1][2]
    return float(x), float(y)


# ----------------------------------------------------------------------------- units

def to_units(xy: np.ndarray, width, height) -> np.ndarray:
    """(N, 2) pixels of images of the given sizes -> [-1, 1] units (the image's edges)."""
    size = np.stack([np.asarray(width, np.float64), np.asarray(height, np.float64)], -1)
    return np.asarray(xy, np.float64) * 2.0 / size - 1.0


def to_pixels(uv: np.ndarray, width, height) -> np.ndarray:
    """The inverse of to_units."""
    size = np.stack([np.asarray(width, np.float64), np.asarray(height, np.float64)], -1)
    return (np.asarray(uv, np.float64) + 1.0) * size / 2.0


# ----------------------------------------------------------------------------- augmentation

def transforms(aug: Augment):
    """fastai's aug_transforms knobs as torchvision.transforms.v2, which moves KeyPoints with the
    image: flip, then rotation / zoom / shift (one affine), perspective warp, then lighting."""
    from torchvision.transforms import v2

    steps = []
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if (aug.max_rotate > 0 or aug.max_zoom > 1 or aug.max_translate > 0) and aug.p_affine > 0:
        steps.append(v2.RandomApply([v2.RandomAffine(
            degrees=aug.max_rotate, translate=(aug.max_translate, aug.max_translate),
            scale=(1.0, aug.max_zoom))], p=aug.p_affine))  # scale > 1: zoom in, as fastai's
    if aug.max_warp > 0 and aug.p_affine > 0:
        steps.append(v2.RandomPerspective(distortion_scale=aug.max_warp, p=aug.p_affine))
    if aug.max_lighting > 0 and aug.p_lighting > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=aug.max_lighting,
                                                    contrast=aug.max_lighting)], p=aug.p_lighting))
    return v2.Compose(steps)


def augment_points(x: torch.Tensor, uv: torch.Tensor, tf) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of a batch (B, C, H, W) and its point (B, 2, units) through `tf`, with its own
    random draws (v2 draws once per call, so a whole-batch call would move every image alike).

    torchvision's KeyPoints index pixels (a flip maps x to W - 1 - x), so continuous coordinates
    are shifted by half a pixel on the way in and out."""
    from torchvision import tv_tensors

    x = to_unit(x)
    h, w = x.shape[-2:]
    px = (uv.detach().double() + 1) * torch.tensor([w, h], dtype=torch.float64) / 2 - 0.5
    xs, pts = [], []
    for img, p in zip(x, px):
        out_img, out_p = tf(tv_tensors.Image(img), tv_tensors.KeyPoints(p.view(1, 2), canvas_size=(h, w)))
        xs.append(out_img.as_subclass(torch.Tensor))
        pts.append(out_p.as_subclass(torch.Tensor).reshape(2).double())
    back = (torch.stack(pts) + 0.5) * 2 / torch.tensor([w, h], dtype=torch.float64) - 1
    return torch.stack(xs), back.to(uv.dtype)


class AugmentPoints(Callback):
    """Replace every training batch by an augmented copy whose points moved with the images;
    seeded by (seed, step) in a forked RNG, so a resumed run replays the same draws and the
    global RNG (dropout) is untouched."""
    order = 5

    def __init__(self, aug: Augment, seed: int):
        self.aug, self.seed, self.tf = aug, seed, transforms(aug)

    def before_batch(self):
        learn = self.learn
        if not learn.training:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + learn.step)
            x, y = augment_points(learn.xb[0], learn.yb, self.tf)
        learn.xb, learn.yb = (x, *learn.xb[1:]), y


# ----------------------------------------------------------------------------- pictures

def plot_points(images: np.ndarray, actual: np.ndarray, predicted: np.ndarray, titles, cols: int = 4,
                dpi: int = 100) -> bytes:
    """uint8 (N, C, H, W) images in a grid with the actual point (green circle) and the predicted
    one (red cross), both (N, 2) in [-1, 1] units; PNG bytes from a private Agg canvas."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(images), 1)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.0 * cols, 2.6 * rows + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.suptitle("green o: actual, red x: predicted (error in pixels of the frame)")
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= len(images):
            continue
        img = images[i]
        h, w = img.shape[-2:]
        ax.imshow(img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0], cmap=None if img.shape[0] == 3 else "gray")
        # imshow puts pixel i's centre at i: continuous pixel coordinates are shifted by half a pixel
        (ax_, ay), (px, py) = to_pixels(actual[i], w, h) - 0.5, to_pixels(predicted[i], w, h) - 0.5
        ax.plot([ax_], [ay], "o", mfc="none", mec="lime", ms=10, mew=2)
        ax.plot([px], [py], "x", color="red", ms=10, mew=2)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
        ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
