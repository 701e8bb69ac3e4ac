"""Seeded data augmentation on batches of image tensors (training only), fastai-style.

One 3x3 matrix per image composes flip, rotation, zoom, translation and a perspective warp, so a
batch is resampled once (one grid_sample), then lighting changes brightness and contrast. Draws
come from a generator seeded by (seed, step): a resumed run replays the same augmentations.
Pixels are on the 0..1 scale (the model normalises), so zero padding is black, as in fastai.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coursepipe.config import ConfigError, Section
from coursepipe.learn.loop import Callback


@dataclass(frozen=True)
class Augment(Section):
    """fastai's aug_transforms knobs; 0 / False turns a transform off. As a params section
    (`model.augment`) every knob must be given: the defaults here are "off", for library use."""
    flip: bool = False          # horizontal flip with p 0.5 (never for digits or text)
    max_rotate: float = 0.0     # degrees, uniform in [-max, max]
    max_zoom: float = 1.0       # scale uniform in [1, max_zoom] (1 = off)
    max_translate: float = 0.0  # shift, fraction of the side, uniform in [-max, max]
    max_warp: float = 0.0       # perspective strength, uniform in [-max, max]
    p_affine: float = 0.75      # chance an image gets the geometric transforms
    max_lighting: float = 0.0   # brightness shift and log-contrast range (0..1 scale)
    p_lighting: float = 0.75    # chance an image gets the lighting change

    def __post_init__(self):
        if self.max_zoom < 1:
            raise ConfigError(f"max_zoom must be >= 1, got {self.max_zoom}")
        for name in ("p_affine", "p_lighting", "max_lighting"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def geometric(self) -> bool:
        return (self.flip or self.max_rotate > 0 or self.max_zoom > 1 or self.max_translate > 0
                or self.max_warp > 0) and self.p_affine > 0

    @property
    def active(self) -> bool:
        return self.geometric or (self.max_lighting > 0 and self.p_lighting > 0)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def matrices(aug: Augment, n: int, g: torch.Generator) -> torch.Tensor:
    """(n, 3, 3) maps from output to input coordinates ([-1, 1] as affine_grid uses)."""
    m = torch.eye(3).repeat(n, 1, 1)
    angle = _uniform(n, -aug.max_rotate, aug.max_rotate, g) * (math.pi / 180)
    scale = 1.0 / _uniform(n, 1.0, aug.max_zoom, g)          # sampling a smaller window = zoom in
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if aug.flip else torch.ones(n)
    m[:, 0, 0], m[:, 0, 1] = cos * flip, -sin
    m[:, 1, 0], m[:, 1, 1] = sin * flip, cos
    m[:, 0, 2] = _uniform(n, -aug.max_translate, aug.max_translate, g) * 2  # [-1, 1] spans 2
    m[:, 1, 2] = _uniform(n, -aug.max_translate, aug.max_translate, g) * 2
    m[:, 2, 0] = _uniform(n, -aug.max_warp, aug.max_warp, g)              # perspective terms
    m[:, 2, 1] = _uniform(n, -aug.max_warp, aug.max_warp, g)
    keep = torch.rand(n, generator=g) >= aug.p_affine
    m[keep] = torch.eye(3)
    return m


def warp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Resample (B, C, H, W) through per-image homographies m (B, 3, 3), zeros outside."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) * 2 + 1) / h - 1  # pixel centres
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    base = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(1, h * w, 3)     # (1, HW, 3)
    pts = base @ m.to(x.device, x.dtype).transpose(1, 2)                            # (B, HW, 3)
    grid = (pts[..., :2] / pts[..., 2:].clamp(min=1e-3)).reshape(b, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def lighting(x: torch.Tensor, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """Brightness shift and contrast scale around mid-grey, per image, clamped to 0..1."""
    n = len(x)
    shift = _uniform(n, -aug.max_lighting / 2, aug.max_lighting / 2, g)
    contrast = torch.exp(_uniform(n, math.log(1 - aug.max_lighting * 0.999),
                                  -math.log(1 - aug.max_lighting * 0.999), g))
    off = torch.rand(n, generator=g) >= aug.p_lighting
    shift[off], contrast[off] = 0.0, 1.0
    view = (n, 1, 1, 1)
    return ((x - 0.5) * contrast.view(view).to(x) + 0.5 + shift.view(view).to(x)).clamp(0, 1)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float on the 0..1 scale (floats pass through)."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else x


def augment(x: torch.Tensor, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """One augmented float batch (0..1) from a uint8 or float batch (B, C, H, W)."""
    x = to_unit(x)
    if aug.geometric:
        x = warp(x, matrices(aug, len(x), g))
    if aug.max_lighting > 0 and aug.p_lighting > 0:
        x = lighting(x, aug, g)
    return x


class AugmentBatch(Callback):
    """Replace the image input of every training batch by an augmented copy (validation untouched)."""
    order = 5

    def __init__(self, aug: Augment, seed: int):
        self.aug, self.seed = aug, seed

    def before_batch(self):
        learn = self.learn
        if not learn.training:
            return
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + learn.step)
        learn.xb = (augment(learn.xb[0], self.aug, g), *learn.xb[1:])
