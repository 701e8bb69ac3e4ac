"""The only module that imports Ray: a recipe's training run as a Ray Train TorchTrainer job.

The same `train_loop_per_worker` runs on one laptop core (1 worker) or many GPUs; it differs
from a plain loop by three things: the model goes through `prepare_model`, each rank reads its
own shard of the rows, and every epoch ends in `ray.train.report` (rank 0 attaches the
checkpoint). A run's name comes from a hash of its params and data, so a restarted run with the
same inputs resumes from its last checkpoint and a changed one starts fresh.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coursepipe.config import RecipeConfig

from coursepipe.learn import fine_tune, setup
from coursepipe.learn.callbacks import Recorder
from coursepipe.learn.loop import Callback

CKPT_FILE = "checkpoint.pt"
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


class RayReport(Callback):
    """After every epoch: all ranks report metrics; rank 0 attaches a full checkpoint."""
    order = 90

    def __init__(self, rank: int, processor: dict, recorder: Recorder):
        self.rank, self.processor, self.recorder = rank, processor, recorder

    def after_epoch(self):
        import ray.train

        learn = self.learn
        metrics = {k: float(v) for k, v in learn.log.items()}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        state = {"model": unwrap(learn.model).state_dict(), "opt": learn.opt.state_dict(),
                 "epoch": learn.epoch_offset + learn.epoch, "step": learn.step,
                 "history": self.recorder.history,
                 "rng": rng_state(), "processor": self.processor}
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / CKPT_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def load_checkpoint(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- the worker loop

def worker_threads(t) -> int:
    """torch intra-op threads per worker: `train.threads` when set (> 0), else cpus_per_worker.

    A model as small as adult's runs no faster on 2 threads than on 1, and on a busy 2-core box
    2 threads stall on each other (epochs of 1 s became 5-20 s), so recipes can ask for fewer
    threads than the CPUs they reserve.
    """
    return t.threads or t.cpus_per_worker


def worker_stats(loop_started: float) -> dict:
    """What the driver cannot see of a worker: its peak memory, threads and loop timestamps."""
    import resource
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "loop_started": loop_started, "loop_ended": time.time()}


def train_loop_per_worker(config: dict) -> dict | None:
    started = time.time()  # wall clock, so the driver can split start-up from teardown
    import ray.train
    import ray.train.torch

    cfg: RecipeConfig = config["cfg"]
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(t))
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)
    device = ray.train.torch.get_device()

    def reduce(x: torch.Tensor) -> torch.Tensor:
        if world > 1:
            torch.distributed.all_reduce(x)
        return x

    parts = setup.build(cfg, config["frame"], rank, world, device, reduce,
                        show=rank == 0 and config.get("verbose", True))
    learn, model = parts.learn, parts.model
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restarted run (same name) or a worker-group restart
        state = load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        learn.opt.load_state_dict(state["opt"])
        set_rng_state(state["rng"])
        start_epoch = state["epoch"] + 1
        parts.recorder.history = list(state["history"])
        if rank == 0:
            print(f"resumed from checkpoint after epoch {state['epoch']}", flush=True)
    learn.add_cbs(RayReport(rank, parts.processor, parts.recorder))

    plan = fine_tune.phases(t)
    first = 0
    for phase in plan:
        if start_epoch < first + phase.epochs:
            setup.enter_phase(parts, phase, t)
            # re-wrap at every phase: DDP syncs only the parameters trainable when it wrapped them
            learn.model = ray.train.torch.prepare_model(model)
            learn.fit(phase.epochs, start_epoch=max(0, start_epoch - first), epoch_offset=first)
        first += phase.epochs
    checksums = rank_checksums(model, world)
    if rank == 0:
        return {"history": parts.recorder.history, "train_seconds": parts.timer.total,
                "start_epoch": start_epoch, "worker": worker_stats(started),
                "rank_checksums": checksums}
    return None


def rank_checksums(model: torch.nn.Module, world: int) -> list[float]:
    """Every rank's sum of |weights| (float64): equal on all ranks when data parallelism held."""
    mine = float(sum(p.detach().double().abs().sum() for p in model.parameters()))
    if world == 1:
        return [mine]
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    return gathered


# ----------------------------------------------------------------------------- the driver side

@dataclass
class FitResult:
    state: dict              # the last checkpoint: model, history, processor, ...
    history: list[dict]
    train_seconds: float     # rank 0's epoch loop (0 when the run was already complete)
    wall_seconds: float      # the whole fit() call, start-up and teardown included
    run_name: str
    storage: str
    worker: dict = dataclasses.field(default_factory=dict)  # rank 0's worker_stats()
    start_epoch: int = 0     # > 0 when the (last) worker group resumed from a checkpoint
    rank_checksums: list = dataclasses.field(default_factory=list)  # per rank, after training


# Ray settings a local cluster inherits from this process; a value already in the environment wins.
RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # its error line, and nothing to watch on one box
    # How often (s) the controller polls the workers, default 2. A worker's report() blocks until
    # the poll takes the previous one, and the end of training is noticed at the next poll: at
    # 2 s, adult's 0.8 s epochs waited ~1 s each and fit() spent ~5 s more in teardown.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}


def set_ray_env() -> None:
    """Apply RAY_ENV before Ray starts (a cluster joined by address keeps its own settings)."""
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local one. Idempotent."""
    import ray

    if ray.is_initialized():
        return
    set_ray_env()
    ray.init(address=os.environ.get("RAY_ADDRESS") or None, logging_level=logging.WARNING,
             configure_logging=True)
    where = os.environ.get("RAY_ADDRESS")
    print(f"training on the Ray cluster at {where}" if where else
          "training on a local Ray instance (set RAY_ADDRESS to use a cluster)", flush=True)


def fit(cfg: RecipeConfig, frame: pd.DataFrame, storage: str, run_name: str,
        verbose: bool = True) -> FitResult:
    """Train `cfg` on the prepared `frame` (with an is_valid column) through Ray Train."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    init_ray()
    t = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "frame": frame, "verbose": verbose},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"Ray run {run_name} finished without a checkpoint")
    state = load_checkpoint(result.checkpoint)
    ret = result.return_value or {}
    return FitResult(state=state, history=list(state["history"]),
                     train_seconds=float(ret.get("train_seconds", 0.0)),
                     wall_seconds=time.perf_counter() - t0, run_name=run_name, storage=storage,
                     worker=dict(ret.get("worker", {})), start_epoch=int(ret.get("start_epoch", 0)),
                     rank_checksums=list(ret.get("rank_checksums", [])))
