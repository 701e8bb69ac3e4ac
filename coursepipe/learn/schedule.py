"""Schedules as pure functions of training progress `pos` in [0, 1] (fastai's callback/schedule)."""
from __future__ import annotations

import math
from typing import Callable

Sched = Callable[[float], float]


def sched_cos(start: float, end: float, pos: float) -> float:
    return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2


def sched_lin(start: float, end: float, pos: float) -> float:
    return start + pos * (end - start)


def sched_exp(start: float, end: float, pos: float) -> float:
    return start * (end / start) ** pos


def combine(pcts: tuple[float, ...], scheds: tuple[Sched, ...]) -> Sched:
    """Run `scheds[i]` over the fraction `pcts[i]` of training; each sees its own pos in [0, 1]."""
    bounds = [0.0]
    for p in pcts:
        bounds.append(bounds[-1] + p)

    def f(pos: float) -> float:
        pos = min(max(pos, 0.0), 1.0)
        for i, sched in enumerate(scheds):
            lo, hi = bounds[i], bounds[i + 1]
            if pos <= hi or i == len(scheds) - 1:
                return sched((pos - lo) / (hi - lo) if hi > lo else 1.0)
        raise AssertionError("unreachable")
    return f


def one_cycle_lr(lr_max: float, pct_start: float = 0.25, div: float = 25.0,
                 div_final: float = 1e5) -> Sched:
    """Cosine warm-up from lr_max/div to lr_max, then cosine annealing to lr_max/div_final."""
    return combine((pct_start, 1 - pct_start),
                   (lambda p: sched_cos(lr_max / div, lr_max, p),
                    lambda p: sched_cos(lr_max, lr_max / div_final, p)))


def one_cycle_mom(moms: tuple[float, float, float], pct_start: float = 0.25) -> Sched:
    """Momentum (Adam's beta1) moves opposite to the learning rate: high -> low -> high."""
    return combine((pct_start, 1 - pct_start),
                   (lambda p: sched_cos(moms[0], moms[1], p),
                    lambda p: sched_cos(moms[1], moms[2], p)))


def lr_range(start: float, end: float) -> Sched:
    """The LR finder's exponential sweep."""
    return lambda p: sched_exp(start, end, p)
