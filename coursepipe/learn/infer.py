"""Batched inference helpers shared by every kind's evaluation and the export's parity check."""
from __future__ import annotations

import torch


@torch.no_grad()
def predict_logits(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], bs: int) -> torch.Tensor:
    """Raw outputs for every row, `bs` rows at a time (bounded memory on any validation size)."""
    model.eval()
    n = len(inputs[0])
    return torch.cat([model(*(x[i:i + bs] for x in inputs)).float() for i in range(0, n, bs)])


def mean_loss(loss_func, logits: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    """Row-weighted mean of a batch-mean loss (CrossEntropyLoss reduces by mean)."""
    total = sum(float(loss_func(logits[i:i + bs], y[i:i + bs])) * len(y[i:i + bs])
                for i in range(0, len(y), bs))
    return total / max(len(y), 1)
