"""fastai's ClassificationInterpretation for images: most-confused pairs and a top-losses grid.

Pure functions; plots are drawn on a private Agg canvas and returned as PNG bytes.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np


def most_confused(cm: np.ndarray, classes: Sequence[str], min_count: int = 1) -> list[tuple[str, str, int]]:
    """(actual, predicted, count) off the diagonal with count >= min_count, commonest first."""
    pairs = [(classes[i], classes[j], int(cm[i, j])) for i in range(len(classes))
             for j in range(len(classes)) if i != j and cm[i, j] >= min_count]
    return sorted(pairs, key=lambda p: (-p[2], p[0], p[1]))


def most_confused_csv(pairs: list[tuple[str, str, int]]) -> str:
    return "actual,predicted,count\n" + "".join(f"{a},{p},{n}\n" for a, p, n in pairs)


def top_losses(losses: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest losses, largest first (ties by index, so it is reproducible)."""
    order = np.lexsort((np.arange(len(losses)), -losses))
    return order[:k]


def plot_top_losses(images: np.ndarray, titles: Sequence[str], cols: int = 3, dpi: int = 100,
                    suptitle: str = "prediction / actual / loss / probability of actual") -> bytes:
    """uint8 (N, C, H, W) images in a grid, each with its title (prediction/actual/loss/prob)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = max(len(images), 1)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.suptitle(suptitle)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if i >= len(images):
            continue
        img = images[i]
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.transpose(1, 2, 0))
        ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
