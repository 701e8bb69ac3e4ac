"""Transfer learning as fastai teaches it: freeze, one-cycle, unfreeze, one-cycle with
discriminative learning rates spread over the param groups from a model's splitter.

Pure pieces (phases, lr spreads, freezing); the training loop runs one `Learner.fit` per phase.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Phase:
    epochs: int
    lr: tuple[float, float]   # (lo, hi): the first param group gets lo, the last hi, geometric between
    pct_start: float
    frozen: bool              # all groups but the last frozen (BatchNorm stays trainable)


def phases(t) -> list[Phase]:
    """One plain one-cycle phase, or fastai's fine_tune when `train.freeze_epochs` > 0:
    freeze_epochs at lr with pct_start 0.99, then epochs at slice(lr/2/lr_mult, lr/2)."""
    if t.freeze_epochs <= 0:
        return [Phase(t.epochs, (t.lr, t.lr), t.pct_start, frozen=False)]
    base = t.lr / 2
    return [Phase(t.freeze_epochs, (t.lr, t.lr), 0.99, frozen=True),
            Phase(t.epochs, (base / t.lr_mult, base), t.pct_start, frozen=False)]


def locate(plan: list[Phase], epoch: int) -> tuple[int, int]:
    """(phase index, epoch within it) of a global epoch; len(plan) when training is complete."""
    for i, ph in enumerate(plan):
        if epoch < ph.epochs:
            return i, epoch
        epoch -= ph.epochs
    return len(plan), 0


def lr_scales(n_groups: int, lo: float, hi: float) -> list[float]:
    """Each group's lr as a fraction of hi: fastai's even geometric steps for slice(lo, hi)."""
    if n_groups == 1 or lo == hi:
        return [1.0] * n_groups
    return [math.exp(math.log(lo / hi) * (1 - i / (n_groups - 1))) for i in range(n_groups)]


def bn_params(model: nn.Module) -> set[int]:
    """ids of BatchNorm weights and biases: fastai keeps these trainable in frozen layers."""
    return {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)}


def freeze_to(model: nn.Module, groups: list[list[nn.Parameter]], n: int, train_bn: bool = True) -> int:
    """Freeze groups[:n] (n < 0 counts from the end), unfreeze the rest; returns trainable count."""
    n = n % len(groups) if n < 0 else min(n, len(groups))
    keep = bn_params(model) if train_bn else set()
    for i, group in enumerate(groups):
        for p in group:
            p.requires_grad_(i >= n or id(p) in keep)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
