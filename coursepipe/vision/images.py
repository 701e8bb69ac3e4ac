"""Image bytes -> uint8 arrays in a declared mode and size, and the statistics to normalise them.

Arrays stay uint8 (N, C, H, W) until the model's input layer: a quarter of float32's memory,
which matters for pets (7k images at 224 px) far more than for MNIST.
"""
from __future__ import annotations

import numpy as np

# decoding is the export's own code, so training and predict.py cannot disagree
from coursepipe.export.portable_image import CHANNELS, decode, decode_many, fit_size, to_mode  # noqa: F401

# Per-channel mean/std of ImageNet: what a pretrained backbone was normalised with.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 (N, C, H, W) pixels, on the 0..1 scale."""
    flat = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64) / 255.0
    return flat.mean(1).tolist(), np.maximum(flat.std(1), 1e-6).tolist()


def normalisation(kind: str, x: np.ndarray) -> tuple[list[float], list[float]]:
    """(mean, std) per channel: the data's own (`data`), ImageNet's (`imagenet`) or none (0, 1)."""
    c = x.shape[1]
    if kind == "data":
        return channel_stats(x)
    if kind == "lite":  # EfficientNet-Lite was trained on (x - 127) / 128 of 0..255 pixels
        return [127.0 / 255] * c, [128.0 / 255] * c
    if kind == "imagenet":
        mean, std = IMAGENET_STATS
        return (list(mean), list(std)) if c == 3 else ([float(np.mean(mean))], [float(np.mean(std))])
    return [0.0] * c, [1.0] * c
