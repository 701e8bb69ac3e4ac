"""A small training loop that raises named events for callbacks (fastai's Learner, pared down).

Events, in order: before_fit, before_epoch, before_train, before_batch, after_loss, after_step,
after_batch, after_train, before_validate, after_validate, after_epoch, after_fit.
Callbacks cancel with the exceptions below. Nothing here knows about Ray or DVC: distribution
comes in through the batch source (sharded per rank), the model (DDP-wrapped or not) and the
`reduce` function used for metrics.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Sequence

import torch
from torch import nn


class CancelFitException(Exception):
    """Stop training now (e.g. the LR finder saw the loss explode)."""


class CancelEpochException(Exception):
    """Skip the rest of this epoch."""


class Callback:
    order = 0
    learn: "Learner"

    def __call__(self, event: str) -> None:
        fn = getattr(self, event, None)
        if fn is not None:
            fn()

    def handler(self, event: str) -> Callable[[], None] | None:
        """What the Learner calls on `event`, or None when this callback ignores it."""
        if type(self).__call__ is not Callback.__call__:  # a callback that routes events itself
            return lambda: self(event)
        return getattr(self, event, None)


Batch = Sequence[torch.Tensor]  # inputs..., target


def local_sum(t: torch.Tensor) -> torch.Tensor:
    return t


class Learner:
    """model + data + loss + optimiser; `fit(epochs)` drives the callbacks.

    `train_batches(epoch)` and `valid_batches()` return iterables of batches for *this* rank.
    `metrics` map a name to f(logits, y) -> (sum, count) tensors so ranks can add them up.
    `reduce` sums a tensor over ranks (identity on one process).
    """

    def __init__(self, model: nn.Module, train_batches: Callable[[int], Iterable[Batch]],
                 valid_batches: Callable[[], Iterable[Batch]], loss_func: nn.Module,
                 opt: torch.optim.Optimizer, metrics: dict | None = None, cbs: Sequence[Callback] = (),
                 device: torch.device | str = "cpu", reduce: Callable = local_sum,
                 autocast_dtype: torch.dtype | None = None,
                 memory_format: torch.memory_format = torch.contiguous_format):
        self.model, self.train_batches, self.valid_batches = model, train_batches, valid_batches
        self.loss_func, self.opt, self.metrics = loss_func, opt, dict(metrics or {})
        self.device, self.reduce, self.autocast_dtype = torch.device(device), reduce, autocast_dtype
        self.memory_format = memory_format  # for 4-D (image) batches; the model is converted by its builder
        self.cbs = sorted(cbs, key=lambda c: c.order)
        for cb in self.cbs:
            cb.learn = self
        # event -> the callbacks' methods for it: four events fire per batch, most callbacks
        # ignore most of them, so looking them up once saves ~2% of a small model's epoch
        self._handlers: dict[str, list[Callable[[], None]]] = {}
        self.epoch, self.n_epochs, self.step, self.total_steps = 0, 0, 0, 0
        self.start_epoch, self.epoch_offset = 0, 0
        self.training = False
        self.log: dict[str, float] = {}

    # -- plumbing
    def __call__(self, event: str) -> None:
        handlers = self._handlers.get(event)
        if handlers is None:
            handlers = self._handlers[event] = [h for h in (cb.handler(event) for cb in self.cbs) if h]
        for h in handlers:
            h()

    def add_cbs(self, *cbs: Callback) -> None:
        for cb in cbs:
            cb.learn = self
        self.cbs = sorted([*self.cbs, *cbs], key=lambda c: c.order)
        self._handlers.clear()

    def remove_cbs(self, *cbs: Callback) -> None:
        self.cbs = [c for c in self.cbs if all(c is not x for x in cbs)]
        self._handlers.clear()

    def cb(self, cls: type) -> Callback | None:
        return next((c for c in self.cbs if isinstance(c, cls)), None)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _to(self, batch: Batch) -> list[torch.Tensor]:
        return [t.to(self.device, non_blocking=True, memory_format=self.memory_format) if t.dim() == 4
                else t.to(self.device, non_blocking=True) for t in batch]

    # -- one batch
    def _train_batch(self, batch: Batch) -> None:
        self.xb, self.yb = batch[:-1], batch[-1]
        self("before_batch")
        with self._autocast():
            self.pred = self.model(*self.xb)
            self.loss = self.loss_func(self.pred.float(), self.yb)
        self("after_loss")
        self.opt.zero_grad(set_to_none=True)
        self.loss.backward()
        self.opt.step()
        self.step += 1
        self("after_step")
        self._loss_sum += self.loss.detach() * len(self.yb)
        self._n += len(self.yb)
        self("after_batch")

    # -- phases
    def _train_epoch(self) -> None:
        self.training = True
        self.model.train()
        self._loss_sum, self._n = torch.zeros((), device=self.device), 0
        self("before_train")
        for batch in self.train_batches(self.epoch_offset + self.epoch):
            self._train_batch(self._to(batch))
        tot = self.reduce(torch.stack([self._loss_sum.float(), torch.tensor(float(self._n), device=self.device)]))
        self.log["train_loss"] = (tot[0] / tot[1].clamp(min=1)).item()
        self("after_train")

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss and metrics over every rank's share of the validation rows."""
        self.training = False
        self.model.eval()
        self("before_validate")
        names = ["valid_loss", *self.metrics]
        sums = torch.zeros(len(names) * 2, device=self.device, dtype=torch.float64)
        # the bare module, not DDP's wrapper: DDP's forward broadcasts buffers (a collective), and
        # ranks may hold different numbers of validation batches (the streaming path scores them
        # all on rank 0), so a wrapped forward would wait forever for ranks that have none
        model = getattr(self.model, "module", self.model)
        for batch in self.valid_batches():
            *xb, yb = self._to(batch)
            with self._autocast():
                pred = model(*xb).float()
            sums[0] += self.loss_func(pred, yb).double() * len(yb)
            sums[1] += len(yb)
            for i, fn in enumerate(self.metrics.values(), start=1):
                s, c = fn(pred, yb)
                sums[2 * i] += s
                sums[2 * i + 1] += c
        sums = self.reduce(sums)
        out = {n: (sums[2 * i] / sums[2 * i + 1].clamp(min=1)).item() for i, n in enumerate(names)}
        self.log.update(out)
        self("after_validate")
        return out

    def fit(self, n_epochs: int, start_epoch: int = 0, steps_per_epoch: int | None = None,
            epoch_offset: int = 0) -> None:
        """Train epochs [start_epoch, n_epochs); a resumed run passes the epoch it stopped after.

        `epoch_offset` numbers this fit's epochs after earlier phases (fine_tune's frozen phase),
        so logs, checkpoints and the data order see one global epoch count."""
        self.n_epochs, self.start_epoch, self.epoch_offset = n_epochs, start_epoch, epoch_offset
        self.steps_per_epoch = steps_per_epoch if steps_per_epoch is not None else \
            self._count_train_batches()
        self.total_steps = self.steps_per_epoch * n_epochs
        self.step = start_epoch * self.steps_per_epoch
        try:
            self("before_fit")
            for epoch in range(start_epoch, n_epochs):
                self.epoch, self.log = epoch, {"epoch": epoch_offset + epoch}
                t0 = time.perf_counter()
                try:
                    self("before_epoch")
                    self._train_epoch()
                    self.validate()
                except CancelEpochException:
                    pass
                self.log["seconds"] = time.perf_counter() - t0
                self("after_epoch")
        except CancelFitException:
            pass
        finally:
            self("after_fit")

    def _count_train_batches(self) -> int:
        """A batch source's len() when it has one; else iterate it once (it may be a generator)."""
        try:
            return len(self.train_batches)
        except TypeError:
            return sum(1 for _ in self.train_batches(0))

    @property
    def pct_train(self) -> float:
        return self.step / max(self.total_steps, 1)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (logits.argmax(-1) == y).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64,
                                                                  device=y.device)
