"""Interpretation for any classification recipe: metrics from predictions, confusion matrix, plots.

Pure functions of (actual, predicted) class indices and class names, no pyplot state (figures are
drawn on an Agg canvas and returned as PNG bytes); `report_classification` at the end is the one
function that writes files: the report every classifying kind's evaluate starts from.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np


def confusion_matrix(actual: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [n_classes, n_classes]: row = actual class, column = predicted class."""
    actual, predicted = np.asarray(actual, np.int64), np.asarray(predicted, np.int64)
    return np.bincount(actual * n_classes + predicted,
                       minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def classification_metrics(actual: np.ndarray, predicted: np.ndarray,
                           classes: Sequence[str]) -> dict[str, float | int]:
    """Flat metrics: accuracy, error_rate, majority_rate and per-class counts / recall / precision.

    Keys stay flat (`n_actual_<class>`) so `dvc metrics show/diff` prints one column each.
    """
    cm = confusion_matrix(actual, predicted, len(classes))
    n = int(cm.sum())
    correct = int(np.trace(cm))
    out: dict[str, float | int] = {
        "n_valid": n,
        "accuracy": correct / n if n else 0.0,
        "error_rate": 1.0 - correct / n if n else 0.0,
        # always answering the commonest class: the score a useless model gets for free
        "majority_rate": float(cm.sum(1).max() / n) if n else 0.0,
    }
    for i, name in enumerate(classes):
        n_actual, n_pred, hit = int(cm[i].sum()), int(cm[:, i].sum()), int(cm[i, i])
        out[f"n_actual_{name}"] = n_actual
        out[f"n_predicted_{name}"] = n_pred
        out[f"n_correct_{name}"] = hit
        out[f"recall_{name}"] = hit / n_actual if n_actual else 0.0
        out[f"precision_{name}"] = hit / n_pred if n_pred else 0.0
    return out


def confusion_csv(actual: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> str:
    """One `actual,predicted` row per example, class names as labels (DVC's confusion template)."""
    names = np.asarray(classes, dtype=object)
    buf = io.StringIO()
    buf.write("actual,predicted\n")
    for a, p in zip(names[np.asarray(actual, np.int64)], names[np.asarray(predicted, np.int64)]):
        buf.write(f"{_csv_field(a)},{_csv_field(p)}\n")
    return buf.getvalue()


def _csv_field(value: str) -> str:
    value = str(value)
    if any(ch in value for ch in ',"\n'):
        return '"' + value.replace('"', '""') + '"'
    return value


def plot_confusion(cm: np.ndarray, classes: Sequence[str], title: str = "Confusion matrix",
                   dpi: int = 100) -> bytes:
    """The matrix as a PNG: class names on both axes, the count in every cell."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(classes)
    side = max(4.0, 0.6 * n + 2.5)  # inches: room for long class names on larger matrices
    fig = Figure(figsize=(side, side), dpi=dpi)
    FigureCanvasAgg(fig)  # a private Agg canvas: no pyplot, no global backend switch
    ax = fig.add_subplot()
    ax.imshow(cm, interpolation="nearest", cmap="Blues")
    ax.set_xticks(range(n), labels=list(classes), rotation=90 if n > 6 else 0)
    ax.set_yticks(range(n), labels=list(classes))
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Actual")
    ax.set_title(title)
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_CSV = "confusion_matrix.csv"


def report_classification(run, inputs: tuple, y, classes: Sequence[str], loss_func):
    """(metrics, logits, confusion matrix) of a classifier on the validation tensors; writes the
    confusion matrix PNG and its `actual,predicted` CSV (DVC's confusion template) into run.plots."""
    from coursepipe.io import write_bytes, write_text
    from coursepipe.learn.infer import mean_loss, predict_logits

    logits = predict_logits(run.model, inputs, run.config.bs)
    actual, predicted = y.numpy(), logits.argmax(1).numpy()
    metrics = classification_metrics(actual, predicted, classes)
    metrics["valid_loss"] = mean_loss(loss_func, logits, y, run.config.bs)
    cm = confusion_matrix(actual, predicted, len(classes))
    write_bytes(run.plots / CONFUSION_PNG, plot_confusion(
        cm, classes, title=f"{run.name}: confusion matrix (n={len(actual)})"))
    write_text(run.plots / CONFUSION_CSV, confusion_csv(actual, predicted, classes))
    return metrics, logits, cm
