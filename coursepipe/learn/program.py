"""The training program: a recipe's model trained on a prepared frame, phase by phase.

One function, `train`, used by every door: the Ray worker loop (coursepipe/distributed/ray_train.py),
the LR finder and the tests. It seeds, builds the Learner from the recipe's kind, resumes from a
checkpoint state when the door has one, and runs the plan (fastai's fine_tune: frozen, then
unfrozen with discriminative learning rates; one plain one-cycle phase otherwise). A distributed
door only supplies `Hooks`, as in Ray's own examples: how to wrap the model (DDP), which shard of
the rows this rank reads, how to sum metrics over ranks, and what to do with each epoch's report.

Checkpoint states hold only tensors and plain Python values (no pickled objects), so they load
with `torch.load(..., weights_only=True)`: a checkpoint from shared storage cannot run code.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
import torch

from coursepipe.config import Train
from coursepipe.learn.callbacks import EpochTable, ParamScheduler, Recorder, Timer
from coursepipe.learn.fine_tune import BodyBatchNorm, Phase, freeze_to, lr_scales
from coursepipe.learn.loop import Callback, Learner, local_sum
from coursepipe.learn.schedule import one_cycle_lr, one_cycle_mom


def _identity(model: torch.nn.Module) -> torch.nn.Module:
    return model


def _no_checkpoint() -> dict | None:
    return None


def _no_report(metrics: dict, state: Callable[[], dict] | None) -> None:
    return None


@dataclass
class Hooks:
    """Where a door differs from a plain single-process run (the defaults)."""
    rank: int = 0
    world: int = 1
    device: torch.device | str = "cpu"
    reduce: Callable[[torch.Tensor], torch.Tensor] = local_sum    # sum over ranks (all_reduce)
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = _identity  # DDP (prepare_model), per phase
    resume: Callable[[], dict | None] = _no_checkpoint            # the state to continue from
    # after every epoch: the epoch's metrics, and on rank 0 a function that makes the checkpoint state
    report: Callable[[dict, Callable[[], dict] | None], None] = _no_report
    show: bool = True                                             # print the per-epoch table
    callbacks: tuple[Callback, ...] = ()                          # the door's own (tests, LR finder)
    # the streaming data path: the processor the driver fitted (the frame then lacks the heavy
    # columns), and batches from the door's data shards, with Kind.batches' signature
    processor: dict | None = None
    batches: Callable | None = None
    # another recipe's model bundle to start from (`starts_from`; Kind.start_from loads it)
    upstream: dict | None = None


@dataclass
class Parts:
    learn: Learner
    model: torch.nn.Module          # the bare model (the Learner may hold a DDP wrapper of it)
    groups: list                    # param groups from the kind's splitter
    processor: dict
    scheduler: ParamScheduler
    recorder: Recorder
    timer: Timer


@dataclass
class Outcome:
    parts: Parts
    history: list[dict]
    start_epoch: int                # > 0 when the run continued from a checkpoint
    train_seconds: float            # this process's epoch loop
    plan: list[Phase] = field(default_factory=list)


# ----------------------------------------------------------------------------- RNG states

def rng_state() -> dict:
    """Every RNG the loop draws from, as tensors and plain values (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ----------------------------------------------------------------------------- building

def threads(t: Train) -> int:
    """torch intra-op threads per worker: `train.threads` when set (> 0), else cpus_per_worker.

    A model as small as adult's runs no faster on 2 threads than on 1, and on a busy 2-core box
    2 threads stall on each other (epochs of 1 s became 5-20 s), so recipes can ask for fewer
    threads than the CPUs they reserve."""
    return t.threads or t.cpus_per_worker


def optimizer(groups, t: Train) -> torch.optim.AdamW:
    """AdamW over the splitter's param groups (decoupled weight decay = fastai's true_wd).

    fused: one kernel for all params instead of ~10 tiny ops per tensor; on CPU torch defaults
    to that per-tensor loop, which took 38% of adult's step (0.84 of 2.23 ms; fused: 0.26 ms).
    """
    return torch.optim.AdamW([{"params": g, "lr_scale": 1.0} for g in groups if g],
                             lr=t.lr, betas=(t.moms[0], t.sqr_mom), eps=t.eps, weight_decay=t.wd,
                             fused=True)


def build(recipe, m, t: Train, frame: pd.DataFrame, hooks: Hooks, history: list[dict] | None = None) -> Parts:
    """Seed, then the Learner for `recipe` with model section m on the frame's rows (is_valid
    splits them); the same on every rank (the processor is deterministic)."""
    torch.set_num_threads(threads(t))
    seed_everything(t.seed)
    kind = recipe.kind
    train_df, valid_df = frame[~frame["is_valid"]], frame[frame["is_valid"]]
    processor = hooks.processor
    if processor is None:
        processor = (kind.fit_processor(recipe, train_df, m) if hooks.upstream is None
                     else kind.processor_from(recipe, train_df, m, hooks.upstream))
    fmt = torch.channels_last if t.channels_last else torch.contiguous_format
    model = kind.build_model(recipe, processor, m)
    if hooks.upstream is not None:  # a resumed run's checkpoint replaces these weights after
        kind.start_from(recipe, m, model, processor, hooks.upstream)
    if t.channels_last:
        model = model.to(memory_format=fmt)  # 4-D weights only; others are left as they are
    batches = hooks.batches or kind.batches
    groups = [g for g in kind.splitter(m, model) if g]
    scheduler, recorder, timer = ParamScheduler({}), Recorder(history), Timer()
    use_amp = t.mixed_precision and torch.device(hooks.device).type == "cuda"
    body_bn = [BodyBatchNorm(t.bn, groups)] if t.bn != "train" else []
    learn = Learner(
        model,
        batches(recipe, processor, train_df, m, t.bs, hooks.rank, hooks.world, t.seed, True),
        batches(recipe, processor, valid_df, m, t.valid_bs, hooks.rank, hooks.world, t.seed, False),
        kind.loss_func(m), optimizer(groups, t), kind.metrics(m),
        cbs=[scheduler, recorder, timer, EpochTable(show=hooks.show),
             *body_bn, *kind.callbacks(recipe, m, t), *hooks.callbacks],
        device=hooks.device, reduce=hooks.reduce,
        autocast_dtype=torch.bfloat16 if use_amp else None, memory_format=fmt)
    return Parts(learn, model, groups, processor, scheduler, recorder, timer)


def enter_phase(parts: Parts, phase: Phase, t: Train) -> int:
    """Freeze or unfreeze for `phase`, spread its learning rates, point the schedules at it.

    Returns the number of trainable parameters. The caller re-wraps the model for DDP after this,
    because DistributedDataParallel only syncs the parameters that required grad when wrapped."""
    n = phase.freeze_to if phase.freeze_to is not None else -1 if phase.frozen else 0
    n_trainable = freeze_to(parts.model, parts.groups, n, train_bn=t.bn == "train")
    lo, hi = phase.lr
    for g, scale in zip(parts.learn.opt.param_groups, lr_scales(len(parts.groups), lo, hi)):
        g["lr_scale"] = scale
    parts.scheduler.scheds = {"lr": one_cycle_lr(hi, phase.pct_start, t.div, t.div_final),
                              "beta1": one_cycle_mom(t.moms, phase.pct_start)}
    return n_trainable


# ----------------------------------------------------------------------------- checkpoints

def checkpoint_state(parts: Parts) -> dict:
    """Everything a resumed run needs, after the epoch that just ended."""
    learn = parts.learn
    return {"model": getattr(learn.model, "module", learn.model).state_dict(),
            "opt": learn.opt.state_dict(), "epoch": learn.epoch_offset + learn.epoch,
            "step": learn.step, "history": [dict(h) for h in parts.recorder.history],
            "rng": rng_state(), "processor": parts.processor}


def restore(parts: Parts, state: dict) -> int:
    """Load a checkpoint state into the parts; returns the first epoch still to run."""
    parts.model.load_state_dict(state["model"])
    parts.learn.opt.load_state_dict(state["opt"])
    set_rng_state(state["rng"])
    parts.recorder.history = list(state["history"])
    return int(state["epoch"]) + 1


class Report(Callback):
    """After every epoch: hand the metrics to the door; rank 0 also a maker of the checkpoint."""
    order = 90

    def __init__(self, hooks: Hooks, parts: Parts):
        self.hooks, self.parts = hooks, parts

    def after_epoch(self):
        metrics = {k: float(v) for k, v in self.learn.log.items()}
        make = (lambda: checkpoint_state(self.parts)) if self.hooks.rank == 0 else None
        self.hooks.report(metrics, make)


# ----------------------------------------------------------------------------- the program

def train(recipe, m, t: Train, frame: pd.DataFrame, hooks: Hooks | None = None,
          plan: list[Phase] | None = None) -> Outcome:
    """Train `recipe`'s model section m with train section t on `frame`, following `plan`
    (default: the kind's, Kind.plan); resumes from hooks.resume() when it gives a state."""
    hooks = hooks or Hooks()
    parts = build(recipe, m, t, frame, hooks)
    start_epoch = 0
    state = hooks.resume()
    if state is not None:  # a restarted run (same name) or a worker-group restart
        start_epoch = restore(parts, state)
        if hooks.rank == 0:
            print(f"resumed from checkpoint after epoch {start_epoch - 1}", flush=True)
    parts.learn.add_cbs(Report(hooks, parts))
    plan = plan if plan is not None else recipe.kind.plan(m, t)
    first = 0
    for phase in plan:
        if start_epoch < first + phase.epochs:
            enter_phase(parts, phase, t)
            # re-wrap at every phase: DDP syncs only the parameters trainable when it wrapped them
            parts.learn.model = hooks.wrap(parts.model)
            parts.learn.fit(phase.epochs, start_epoch=max(0, start_epoch - first), epoch_offset=first)
        first += phase.epochs
    return Outcome(parts, parts.recorder.history, start_epoch, parts.timer.total, plan)
