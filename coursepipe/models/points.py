"""Point regression (lesson 3's head pose): a pretrained body and a head that outputs (x, y) in
[-1, 1] units of the input image.

PointNet = ImageInput -> transfer body (EfficientNet-Lite0 or a ResNet, models/transfer.py, so
the same pretrained weights, LoadPretrained and splitter apply) -> one of two heads:
  softargmax  a 1x1 conv makes a heatmap over the last feature grid; its softmax-weighted mean of
              the cell centres is the point, then a 2x2 affine (identity at start) lets it reach
              beyond the outer cell centres. The point's position stays spatial all the way,
              which on the CPU-sized synthetic sample reached valid MSE 0.0022 (3 seeds) where
  pool        fastai's pooled head (create_head, n_out 2; the course's cnn_learner regression)
              ended at 0.124 in the same epochs, worse than predicting the training mean
              (0.044; docs/RESULTS.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from coursepipe.models.transfer import ARCHS, body, create_head
from coursepipe.models.vision import ImageInput

HEADS = ("softargmax", "pool")


def cell_centres(n: int, device=None, dtype=None) -> torch.Tensor:
    """The centres of n equal cells spanning [-1, 1]: (2i + 1) / n - 1."""
    return (torch.arange(n, device=device, dtype=dtype) * 2 + 1) / n - 1


class SoftArgmax(nn.Module):
    """Features (B, C, H, W) -> heatmap logits (B, 1, H, W) -> expected cell centre (B, 2) as
    (x, y), then a learnt affine map initialised to the identity."""

    def __init__(self, nf: int):
        super().__init__()
        self.heat = nn.Conv2d(nf, 1, 1)
        self.affine = nn.Linear(2, 2)
        with torch.no_grad():
            self.affine.weight.copy_(torch.eye(2))
            self.affine.bias.zero_()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        b, _, h, w = f.shape
        p = torch.softmax(self.heat(f).reshape(b, h * w), 1).reshape(b, h, w)   # (B, H, W)
        x = (p.sum(1) * cell_centres(w, f.device, p.dtype)).sum(1)                # (B,)
        y = (p.sum(2) * cell_centres(h, f.device, p.dtype)).sum(1)                # (B,)
        return self.affine(torch.stack([x, y], 1))                                # (B, 2)


class PointNet(nn.Module):
    """uint8 (or 0..1) images (B, 3, H, W) -> points (B, 2) in [-1, 1] units as (x, y)."""

    def __init__(self, arch: str, mean, std, head: str = "softargmax",
                 lin_ftrs: Sequence[int] = (512,), ps: float = 0.5):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown point head {head!r}; expected one of {list(HEADS)}")
        self.arch = arch  # load_backbone reads it: which layer names the weight file has
        self.stem = ImageInput(mean, std)
        self.backbone = body(arch)
        nf = ARCHS[arch][1]
        self.head = SoftArgmax(nf) if head == "softargmax" else create_head(nf, 2, lin_ftrs, ps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.stem(x)))
