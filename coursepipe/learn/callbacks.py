"""Callbacks every recipe shares: schedules, history, progress."""
from __future__ import annotations

import time

import torch

from coursepipe.learn.loop import Callback
from coursepipe.learn.schedule import Sched


class ParamScheduler(Callback):
    """Set optimiser hyper-parameters from pure schedules before every batch.

    `scheds` maps a hyper-parameter ("lr", "beta1") to a schedule of training progress. For
    discriminative learning rates each param group has its own `lr_scale` (group lr = scale * lr).
    """
    order = 1

    def __init__(self, scheds: dict[str, Sched]):
        self.scheds = scheds

    def _apply(self, pos: float) -> None:
        values = {name: sched(pos) for name, sched in self.scheds.items()}  # once, not per group
        for g in self.learn.opt.param_groups:
            for name, v in values.items():
                if name == "lr":
                    g["lr"] = v * g.get("lr_scale", 1.0)
                elif name == "beta1":
                    g["betas"] = (v, g["betas"][1])
                else:
                    g[name] = v

    def before_fit(self):
        self._apply(self.learn.pct_train)

    def before_batch(self):
        if self.learn.training:
            self._apply(self.learn.pct_train)


class Recorder(Callback):
    """Per-epoch history (one dict per epoch) and per-step lr/loss for plots.

    `losses` grows at the end of each training phase: reading a loss per batch (`.item()`)
    would make the CPU wait for a GPU on every step.
    """
    order = 50

    def __init__(self, history: list[dict] | None = None):
        self.history = list(history or [])
        self.lrs, self.losses = [], []
        self._pending: list = []  # this phase's detached per-batch losses

    def after_batch(self):
        if self.learn.training:
            self.lrs.append(self.learn.opt.param_groups[-1]["lr"])
            self._pending.append(self.learn.loss.detach())

    def _flush(self):
        if self._pending:
            self.losses.extend(torch.stack(self._pending).float().tolist())
            self._pending = []

    def after_train(self):
        self._flush()

    def after_fit(self):  # a cancelled epoch skips after_train
        self._flush()

    def after_epoch(self):
        self.history.append(dict(self.learn.log))


class EpochTable(Callback):
    """A short per-epoch table in the log, and a tqdm bar over batches (rank 0 only)."""
    order = 60

    def __init__(self, show: bool = True, bar: bool = True):
        self.show, self.bar_on, self.bar, self._header = show, bar, None, False

    def before_train(self):
        if self.show and self.bar_on:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.learn.steps_per_epoch, desc=f"epoch {self.learn.epoch}",
                            leave=True, mininterval=1.0)

    def after_batch(self):
        if self.bar is not None:
            self.bar.update(1)

    def after_train(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_epoch(self):
        if not self.show:
            return
        log = self.learn.log
        keys = [k for k in log if k != "epoch"]
        if not self._header:
            print("  ".join(f"{k:>12}" for k in ["epoch", *keys]), flush=True)
            self._header = True
        print("  ".join([f"{log['epoch']:>12}"] + [f"{log[k]:>12.4f}" for k in keys]), flush=True)


class Timer(Callback):
    """Seconds spent inside the epoch loop (what the course's training time counts).

    `seconds` is the last fit's; `total` adds up every fit (fine_tune runs one per phase)."""
    order = 70

    def __init__(self):
        self.seconds = self.total = 0.0

    def before_fit(self):
        self.t0, self.seconds = time.perf_counter(), 0.0

    def after_fit(self):
        self.seconds = time.perf_counter() - self.t0
        self.total += self.seconds
