"""Grad-CAM (lesson 6): where in the image the model found the evidence for its prediction.

The last convolutional block's activations A (C, h, w), weighted by the channel means of the
gradient of the class score with respect to them, summed over channels, ReLU'd:
cam = relu(sum_c mean_hw(dScore/dA_c) * A_c). "The last convolutional block" is found, not
named: the last module whose output still has a spatial grid (h, w > 1) in forward order, which
is the body's output for the transfer nets and the last conv stage for the scratch nets, so one
function serves every image model of the zoo.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from torch import nn


def last_grid_output(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the last (B, C, h, w) activation with h, w > 1) of one forward pass, the
    activation kept in the graph so its gradient can be taken."""
    seen: list[torch.Tensor] = []

    def keep(_module, _inputs, out):
        if isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[2:]) > 1:
            seen.append(out)

    handles = [m.register_forward_hook(keep) for m in model.modules() if m is not model]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        raise ValueError(f"{type(model).__name__} has no layer with a spatial output: no Grad-CAM")
    return logits, seen[-1]


def gradcam(model: nn.Module, x: torch.Tensor, classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(heatmaps (B, h, w) in [0, 1], the class each map explains) for images x; the class is
    the predicted one unless given. The model is left as it was (eval mode, no grads kept)."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits, acts = last_grid_output(model, x)
            target = logits.argmax(1) if classes is None else torch.as_tensor(list(classes))
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, acts)
        weights = grads.mean((2, 3), keepdim=True)               # (B, C, 1, 1)
        cam = torch.relu((weights * acts).sum(1)).detach()       # (B, h, w)
        top = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
        return (cam / top).numpy(), target.numpy()
    finally:
        model.train(was_training)


def upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(B, h, w) maps to (B, H, W), bilinear, as the overlay shows them."""
    t = torch.from_numpy(cam).unsqueeze(1).float()
    return torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()


def plot_gradcam(images: np.ndarray, cams: np.ndarray, titles: Sequence[str], cols: int = 4,
                 dpi: int = 100) -> bytes:
    """uint8 (N, C, H, W) images with their heatmaps over them (jet, alpha 0.5), as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(images), 1)
    cols = min(cols, n)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.suptitle("Grad-CAM: where the evidence for the named class is")
    heat = upsample(cams, images.shape[2:]) if len(images) else cams
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= len(images):
            continue
        img = images[i].transpose(1, 2, 0)
        ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
        ax.imshow(heat[i], cmap="jet", alpha=0.5, extent=(0, img.shape[1], img.shape[0], 0))
        ax.set_title(titles[i], fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
