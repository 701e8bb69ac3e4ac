"""Image classifiers: lesson 7's MNIST ResNet from scratch and lesson 5's simple nets.

Every model starts with ImageInput, so it takes uint8 pixels (what the export feeds it) or
0..1 floats (what augmentation yields) and normalises with the processor's mean/std; the
normalisation therefore travels inside the ONNX graph and cannot drift from training.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class ImageInput(nn.Module):
    """uint8 (B, C, H, W) -> float / 255, or 0..1 floats as they are; then (x - mean) / std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x
        return (x - self.mean) / self.std


def conv_layer(ni: int, nf: int, stride: int = 1) -> nn.Sequential:
    """fastai v1's conv_layer: 3x3 conv (no bias: BN follows) -> ReLU -> BatchNorm."""
    return nn.Sequential(nn.Conv2d(ni, nf, 3, stride=stride, padding=1, bias=False),
                         nn.ReLU(inplace=True), nn.BatchNorm2d(nf))


def conv2(ni: int, nf: int) -> nn.Sequential:
    """The lesson's stride-2 conv: halves the grid."""
    return conv_layer(ni, nf, stride=2)


class ResBlock(nn.Module):
    """x + conv(conv(x)) at constant width (lesson 7's res_block)."""

    def __init__(self, nf: int):
        super().__init__()
        self.convs = nn.Sequential(conv_layer(nf, nf), conv_layer(nf, nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convs(x)


def mnist_resnet(in_ch: int, n_classes: int, widths: Sequence[int]) -> nn.Sequential:
    """conv2 + res_block per width (28 -> 14 -> 7 -> 4 -> 2), then conv2 to n_classes and flatten."""
    layers, ni = [], in_ch
    for nf in widths:
        layers += [conv2(ni, nf), ResBlock(nf)]
        ni = nf
    # the lesson ends in conv2(16, 10) on a 2x2 grid: 1x1 logits; pooling keeps any input size
    layers += [conv2(ni, n_classes), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def simple_cnn(in_ch: int, n_classes: int, widths: Sequence[int]) -> nn.Sequential:
    """Lesson 7's plain net: stride-2 conv + BN + ReLU per width, no skip connections."""
    layers, ni = [], in_ch
    for nf in widths:
        layers += [nn.Conv2d(ni, nf, 3, stride=2, padding=1), nn.BatchNorm2d(nf), nn.ReLU(inplace=True)]
        ni = nf
    layers += [nn.Conv2d(ni, n_classes, 3, stride=2, padding=1), nn.BatchNorm2d(n_classes),
               nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def linear(in_ch: int, n_classes: int, pixels: int, hidden: Sequence[int]) -> nn.Sequential:
    """Lesson 5's Mnist_Logistic (hidden=[]) or Mnist_NN (hidden=[50]): flatten -> linear layers."""
    layers: list[nn.Module] = [nn.Flatten()]
    ni = in_ch * pixels
    for nh in hidden:
        layers += [nn.Linear(ni, nh), nn.ReLU(inplace=True)]
        ni = nh
    layers.append(nn.Linear(ni, n_classes))
    return nn.Sequential(*layers)


ARCHS = ("resnet", "simple_cnn", "linear")


class ImageClassifier(nn.Module):
    """ImageInput -> body; forward(x) takes the one image tensor the export names `x`."""

    def __init__(self, stem: ImageInput, body: nn.Module):
        super().__init__()
        self.stem, self.body = stem, body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


def build(arch: str, in_ch: int, n_classes: int, size: tuple[int, int], mean, std,
          widths: Sequence[int], hidden: Sequence[int] = ()) -> ImageClassifier:
    """One of ARCHS behind the normalising input layer."""
    if arch == "resnet":
        body = mnist_resnet(in_ch, n_classes, widths)
    elif arch == "simple_cnn":
        body = simple_cnn(in_ch, n_classes, widths)
    elif arch == "linear":
        body = linear(in_ch, n_classes, size[0] * size[1], hidden)
    else:
        raise ValueError(f"unknown image arch {arch!r}; expected one of {ARCHS}")
    return ImageClassifier(ImageInput(mean, std), body)
