"""The LR finder: an exponentially growing learning rate over a few hundred steps, stopped when
the loss explodes, weights restored afterwards (fastai's lr_find, as "just another scheduler
that cancels")."""
from __future__ import annotations

import copy
import math

from coursepipe.learn.loop import CancelEpochException, CancelFitException, Callback, Learner
from coursepipe.learn.schedule import sched_exp


class LRFinder(Callback):
    order = 2  # after ParamScheduler: its lr wins

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                 stop_div: bool = True, beta: float = 0.98):
        self.start_lr, self.end_lr, self.num_it = start_lr, end_lr, num_it
        self.stop_div, self.beta = stop_div, beta
        self.lrs: list[float] = []
        self.losses: list[float] = []  # smoothed (debiased exponential moving average)

    def before_fit(self):
        self.i, self.avg, self.best = 0, 0.0, math.inf

    def before_batch(self):
        if not self.learn.training:
            return
        lr = sched_exp(self.start_lr, self.end_lr, self.i / max(self.num_it - 1, 1))
        for g in self.learn.opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.lrs.append(lr)

    def after_batch(self):
        if not self.learn.training:
            return
        self.i += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * self.learn.loss.item()
        smooth = self.avg / (1 - self.beta ** self.i)
        self.losses.append(smooth)
        self.best = min(self.best, smooth)
        if self.i >= self.num_it or (self.stop_div and (smooth > 4 * self.best or math.isnan(smooth))):
            raise CancelFitException()

    def before_validate(self):
        raise CancelEpochException()  # skip validation; a small dataset needs several epochs of steps


def suggestions(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """fastai's rules of thumb: the minimum's lr / 10, and the steepest descent of loss vs log lr."""
    if len(lrs) < 3:
        raise ValueError(f"the LR finder ran only {len(lrs)} steps; nothing to suggest")
    i_min = min(range(len(losses)), key=losses.__getitem__)
    # the steepest descent on the way down to the minimum; the first tenth of the sweep is
    # skipped because the moving average is still warming up there
    lo = min(len(lrs) // 10, max(i_min - 1, 0))
    span = range(lo, max(i_min, lo + 1))
    slope = lambda i: (losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i]))
    i_steep = min(span, key=slope)
    return {"minimum": lrs[i_min] / 10, "steep": lrs[i_steep]}


def lr_find(learn: Learner, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100) -> dict:
    """Run the sweep on `learn`, restore its model and optimiser, return lrs, losses, suggestions."""
    model_state = copy.deepcopy(learn.model.state_dict())
    opt_state = copy.deepcopy(learn.opt.state_dict())
    finder = LRFinder(start_lr, end_lr, num_it)
    learn.add_cbs(finder)
    epochs = -(-num_it // max(sum(1 for _ in learn.train_batches(0)), 1)) + 1
    try:
        learn.fit(epochs)
    finally:
        learn.remove_cbs(finder)
        learn.model.load_state_dict(model_state)
        learn.opt.load_state_dict(opt_state)
    return {"lrs": finder.lrs[:len(finder.losses)], "losses": finder.losses,
            "suggestions": suggestions(finder.lrs[:len(finder.losses)], finder.losses)}


def plot(result: dict, title: str) -> bytes:
    """Loss vs learning rate (log scale) with the suggestions marked, as PNG bytes."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result["lrs"], result["losses"])
    for (name, lr), color in zip(result["suggestions"].items(), ("tab:red", "tab:green")):
        ax.axvline(lr, color=color, linestyle="--", label=f"{name}: {lr:.2e}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title=title)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
