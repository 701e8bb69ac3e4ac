"""Language-model evaluation: next-token accuracy, loss, perplexity, accuracy by position."""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch

from coursepipe.io import write_bytes
from coursepipe.models.rnn import flat, set_carry

POSITION_PNG = "accuracy_by_position.png"


@torch.no_grad()
def stream_scores(model, batches) -> tuple[float, float, int]:
    """(accuracy, mean loss, tokens) over contiguous batches, state carried as in training."""
    model.eval()
    set_carry(model, True)
    correct, loss, n = 0, 0.0, 0
    try:
        for x, y in batches():
            p, t = flat(model(x).float(), y)
            correct += int((p.argmax(-1) == t).sum())
            loss += float(torch.nn.functional.cross_entropy(p, t, reduction="sum"))
            n += len(t)
    finally:
        set_carry(model, False)
    return correct / max(n, 1), loss / max(n, 1), n


@torch.no_grad()
def position_accuracy(model, x: torch.Tensor, y: torch.Tensor, bs: int) -> torch.Tensor:
    """Accuracy at each window position from a zero state (what the export computes)."""
    model.eval()
    preds = torch.cat([model(x[i:i + bs]).argmax(-1) for i in range(0, len(x), bs)])
    target = y[:, -1] if preds.dim() == 1 else y
    hits = (preds == target).double()
    return hits.mean(0) if hits.dim() == 2 else hits.mean().reshape(1)


def plot_positions(acc_zero: torch.Tensor, acc_stream: float, title: str) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    pos = range(1, len(acc_zero) + 1) if len(acc_zero) > 1 else [1]
    ax.plot(list(pos), acc_zero.tolist(), marker="o", label="from a zero state (export)")
    ax.axhline(acc_stream, color="C1", linestyle="--", label=f"state carried: {acc_stream:.3f}")
    ax.set(xlabel="position in the window (tokens seen)", ylabel="next-token accuracy",
           ylim=(0, 1), title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def evaluate_lm(model, processor: dict, batches, windows, plots: Path, title: str, bs: int):
    """(metrics, plot path) for a language model on the validation stream."""
    acc, loss, n = stream_scores(model, batches)
    x, y = windows
    by_pos = position_accuracy(model, x, y, bs)
    metrics = {"accuracy": acc, "valid_loss": loss, "perplexity": math.exp(loss), "tokens": n,
               "accuracy_zero_state": float(by_pos.mean()),
               "vocab_size": len(processor["itos"])}
    path = plots / POSITION_PNG
    write_bytes(path, plot_positions(by_pos, acc, title))
    return metrics, path
