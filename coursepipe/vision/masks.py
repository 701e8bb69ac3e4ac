"""Segmentation masks (lesson 3): one class index per pixel, stored as PNG bytes beside the image.

Checks of an (image, mask) pair before anything trains on it, each naming the file: both present
and decodable, the same size, a single-channel mask (mode L, P or I) whose values index codes.txt.
Per-class pixel counts feed the validation report; a fixed palette colours masks for pictures
and for predict.py's output (the palette and decoding are the export's own, so they agree).
"""
from __future__ import annotations

import io

import numpy as np

# decoding, the palette and colouring are the portable module's, so training and predict.py agree
from coursepipe.export.portable_segmentation import (IGNORE, colourise, decode_mask, decode_masks,  # noqa: F401
                                                     palette)

MASK_MODES = ("L", "P", "I", "I;16")     # single channel: the value is the class index


def mask_array(data: bytes) -> np.ndarray:
    """A mask file's class indices (H, W) as int64, at its own size."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in MASK_MODES:
            raise ValueError(f"mode {im.mode} is not a single-channel mask (expected one of {list(MASK_MODES)})")
        return np.asarray(im, dtype=np.int64)


def pair_problem(path: str, mask_path: str, image: bytes, mask: bytes, n_codes: int) -> tuple[str, np.ndarray | None]:
    """('' or why the pair cannot be trained on, naming the file; the mask's pixel counts per
    class index (n_codes,) when the pair is fine)."""
    from PIL import Image

    if not mask_path:
        return f"{path}: has no mask", None
    if not path:
        return f"{mask_path}: mask without an image", None
    try:
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            size = im.size
    except Exception as e:  # PIL raises many types
        return f"{path}: cannot decode ({' '.join(str(e).split()) or type(e).__name__})", None
    try:
        arr = mask_array(mask)
    except Exception as e:
        return f"{mask_path}: cannot read the mask ({' '.join(str(e).split()) or type(e).__name__})", None
    if (arr.shape[1], arr.shape[0]) != size:
        return (f"{mask_path}: mask is {arr.shape[1]}x{arr.shape[0]}, its image {path} is "
                f"{size[0]}x{size[1]}"), None
    bad = np.unique(arr[(arr < 0) | (arr >= n_codes)])
    if len(bad):
        return (f"{mask_path}: values {bad[:5].tolist()} outside codes.txt's 0..{n_codes - 1}"), None
    return "", np.bincount(arr.ravel(), minlength=n_codes)


def pixel_shares(counts: np.ndarray) -> np.ndarray:
    """Each class's share of one mask's pixels."""
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def plot_predictions(images: np.ndarray, truth: np.ndarray, predicted: np.ndarray, colours: np.ndarray,
                     titles: list[str], dpi: int = 100) -> bytes:
    """One row per frame: image / truth / prediction side by side, masks in the palette's colours
    (uint8 images (N, 3, H, W), masks (N, H, W)); PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(images), 1)
    h, w = images.shape[2:] if len(images) else (1, 1)
    fig = Figure(figsize=(9.0, 3.0 * n * h / w + 0.6), dpi=dpi)
    FigureCanvasAgg(fig)
    for i in range(len(images)):
        for j, (pic, label) in enumerate(((images[i].transpose(1, 2, 0), "image"),
                                          (colourise(truth[i], colours), "truth"),
                                          (colourise(predicted[i], colours), "prediction"))):
            ax = fig.add_subplot(n, 3, 3 * i + j + 1)
            ax.imshow(pic)
            ax.axis("off")
            ax.set_title(f"{label}: {titles[i]}" if j == 0 else label, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
