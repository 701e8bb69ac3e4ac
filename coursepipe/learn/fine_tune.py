"""Transfer learning as fastai teaches it: freeze, one-cycle, unfreeze, one-cycle with
discriminative learning rates spread over the param groups from a model's splitter.

Pure pieces (phases, lr spreads, freezing); the training loop runs one `Learner.fit` per phase.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from coursepipe.learn.loop import Callback


@dataclass(frozen=True)
class Phase:
    epochs: int
    lr: tuple[float, float]   # (lo, hi): the first param group gets lo, the last hi, geometric between
    pct_start: float
    frozen: bool              # all groups but the last frozen (BatchNorm stays trainable)
    freeze_to: int | None = None  # instead: freeze all groups before this one (-2: train the last two)


def phases(t) -> list[Phase]:
    """One plain one-cycle phase, or fastai's fine_tune when `train.freeze_epochs` > 0:
    freeze_epochs at lr with pct_start 0.99, then epochs at slice(u / lr_mult, u) where u is
    `train.unfrozen_lr`, or lr / 2 as fastai's fine_tune (lesson 1 unfreezes at slice(1e-6, 1e-4))."""
    if t.freeze_epochs <= 0:
        return [Phase(t.epochs, (t.lr, t.lr), t.pct_start, frozen=False)]
    base = t.unfrozen_lr if t.unfrozen_lr is not None else t.lr / 2
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


class BodyBatchNorm(Callback):
    """`train.bn`: BatchNorm layers of the body (every param group but the last, the head) run in
    eval mode, so they normalise with their running statistics and never update them.

    `freeze_frozen`: only those whose parameters are frozen (fastai's BnFreeze); `fixed_stats`:
    all of the body's, in every phase. Why: with a few hundred images in batches of 16, batch
    statistics are noisy and drift the pretrained ones; on the real pets subset (5 images a breed)
    train-mode BN kept the fine-tune at 0.70 while fixed statistics reached 0.85 (docs/RESULTS.md).
    The loop calls model.train() before `before_train`, so this runs after it every epoch."""
    order = 2

    def __init__(self, mode: str, groups: list[list[nn.Parameter]]):
        self.mode = mode
        self.body = {id(p) for g in groups[:-1] for p in g}

    def before_train(self):
        model = getattr(self.learn.model, "module", self.learn.model)
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            params = list(m.parameters(recurse=False))
            if not params or id(params[0]) not in self.body:
                continue
            if self.mode == "fixed_stats" or not any(p.requires_grad for p in params):
                m.eval()
