"""The only module that imports Ray: a recipe's training run as a Ray Train TorchTrainer job.

The worker loop is the library's training program (coursepipe/learn/program.py) with Ray's hooks,
as in Ray's own examples: the model goes through `prepare_model`, each rank reads its own shard of
the rows, metrics are summed with all_reduce, and every epoch ends in `ray.train.report` (rank 0
attaches the checkpoint). A run's name comes from a hash of its params and data, so a restarted
run with the same inputs resumes from its last checkpoint and a changed one starts fresh.

A worker receives only the recipe object, its `model` and `train` sections and the prepared
frame: it cannot read a param that the train stage does not declare to DVC.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from coursepipe.config import ConfigError, Train
from coursepipe.contract import ContractError, even_steps
from coursepipe.distributed.cluster import RAY_ENV
from coursepipe.learn import program

CKPT_FILE = "checkpoint.pt"
SUM_FILE = "checkpoint.sha256"  # written after CKPT_FILE: a checkpoint without it is incomplete
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint failed verification (missing, truncated, altered): the message names it."""


class TrainingError(RuntimeError):
    """Training failed in a Ray worker; the message names the cause in one line."""


# Errors that fail the same way on every attempt: retrying them only burns max_failures restarts.
NOT_RETRIED: tuple[type[BaseException], ...] = (
    ConfigError, ContractError, CheckpointError, ValueError, TypeError, KeyError, IndexError,
    NotImplementedError)
SHAPE_ERRORS = ("size mismatch", "shapes cannot be multiplied", "must match the size", "shape '[")


def deterministic(e: BaseException) -> bool:
    """Whether `e` would recur on a retry: bad config or data, a contract or shape mismatch."""
    return isinstance(e, NOT_RETRIED) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in SHAPE_ERRORS))


def one_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {text.strip().splitlines()[0] if text.strip() else '(no message)'}"


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(state: dict, folder: Path) -> Path:
    """checkpoint.pt and, after it, its sha256 (so a torn write never verifies)."""
    from coursepipe.io import file_digest

    path = Path(folder) / CKPT_FILE
    torch.save(state, path)
    (Path(folder) / SUM_FILE).write_text(file_digest(path) + "\n")
    return path


def read_checkpoint(folder: Path, name: str) -> dict:
    """Verify a checkpoint folder against its checksum, then load it with weights_only (tensors
    and plain values: no code in a checkpoint from shared storage can run)."""
    from coursepipe.io import file_digest

    path, sums = Path(folder) / CKPT_FILE, Path(folder) / SUM_FILE
    if not path.is_file() or not sums.is_file():
        raise CheckpointError(f"checkpoint {name} is incomplete (no {CKPT_FILE} or {SUM_FILE})")
    if file_digest(path) != sums.read_text().strip():
        raise CheckpointError(f"checkpoint {name} is corrupt ({CKPT_FILE} does not match {SUM_FILE})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # verified bytes that still do not load: not written by this project
        raise CheckpointError(f"checkpoint {name} does not load ({one_line(e)})") from None


def load_checkpoint(checkpoint) -> dict:
    """A Ray checkpoint's state, verified (see read_checkpoint)."""
    with checkpoint.as_directory() as d:
        return read_checkpoint(Path(d), checkpoint.path)


def older_checkpoints(checkpoint) -> list:
    """The run's other checkpoints, newest first (Ray names them checkpoint_<timestamp>)."""
    import posixpath

    import pyarrow.fs
    import ray.train

    fs, parent = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
    found = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(parent))
             if i.type == pyarrow.fs.FileType.Directory
             and posixpath.basename(i.path).startswith("checkpoint_")
             and i.path.rstrip("/") != checkpoint.path.rstrip("/")]
    return [ray.train.Checkpoint(p, filesystem=fs) for p in sorted(found, reverse=True)]


def newest_good(latest, candidates: list) -> dict:
    """The state of the newest checkpoint that verifies, saying which ones it skipped; a
    CheckpointError naming all of them when none does."""
    rejected: list[str] = []
    for ckpt in [latest, *candidates]:
        try:
            state = load_checkpoint(ckpt)
        except CheckpointError as e:
            rejected.append(str(e))
            print(f"skipping {e}", flush=True)
            continue
        if rejected:
            print(f"resuming from the older checkpoint {ckpt.path}", flush=True)
        return state
    raise CheckpointError(f"no checkpoint of this run verifies ({'; '.join(rejected)}); delete "
                          f"the run folder {latest.path.rsplit('/', 1)[0]} to start over")


def ray_report(rank: int):
    """program.Hooks.report: every rank reports its metrics; rank 0 attaches the checkpoint."""
    def report(metrics: dict, make_state) -> None:
        import ray.train

        if make_state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(make_state(), Path(d))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    return report


def resume_from_ray() -> dict | None:
    """The newest checkpoint of this run that verifies (falling back past corrupt ones)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else newest_good(checkpoint, older_checkpoints(checkpoint))


# ----------------------------------------------------------------------------- the streaming data path

@dataclass(frozen=True)
class Stream:
    """train.data_path: ray_data: the driver's part. Workers get a light frame (no heavy columns)
    and this processor; their rows arrive from Ray Data, decoded in its tasks."""
    table: str          # the prepared parquet; on a multi-node cluster a path every node sees
    processor: dict     # fitted once, on the driver


def decode_rows(recipe, processor: dict, m, df: pd.DataFrame) -> dict:
    """Ray Data's map_batches: prepared rows, bytes included -> the kind's stream_rows (numpy
    columns t0 (first input) .. tN (target)). Rows the kind does not use are dropped here."""
    df = recipe.kind.usable(df)
    if df.empty:  # a block of excluded rows only
        return {}
    return recipe.kind.stream_rows(recipe, processor, df)


def decode_room(t: Train, cluster_cpus: float) -> None:
    """Refuse, before training, a streaming run whose decode tasks could never start: Ray Train
    reserves num_workers x cpus_per_worker CPUs for its workers, and a Ray Data task only runs on
    what is left (the run would wait forever for its first batch). A cluster that autoscales
    counts what it has now."""
    left = cluster_cpus - t.num_workers * t.cpus_per_worker
    if t.decode_cpus > left:
        raise ConfigError(
            f"train.decode_cpus is {t.decode_cpus:g}, but the Ray cluster's {cluster_cpus:g} CPUs "
            f"less train.num_workers x train.cpus_per_worker ({t.num_workers} x "
            f"{t.cpus_per_worker}) leave {max(left, 0):g} for Ray Data's decode tasks: lower "
            f"train.decode_cpus (0 shares the workers' CPUs), num_workers or cpus_per_worker")


def use_datasource_v2() -> bool:
    """Ray Data's parquet reader: V1 unless RAY_DATA_USE_DATASOURCE_V2 (Ray's own switch) says.

    A prepared table is one file. V1 reads its footer once, on the driver, when the dataset is
    defined. V2 (Ray 2.60's default) lists files and reads footers again in every execution,
    which is every epoch, in new `FooterReader` actor processes (2 per execution, seen in the
    session's worker logs). bench/throughput.py, 1,000 images x 3 epochs, interleaved runs on
    this 2-core machine: V2 0.61x / 0.61x of the bare loop, fit() wall 54.8 / 55.2 s; V1
    0.66x / 0.68x, 52.1 / 50.6 s, and epochs 1-2 wait 0.0 s for their first batch (V2 0.6-1.8 s).
    V1 reads a file in one task; decode, the costly part, still runs on many blocks."""
    return os.environ.get("RAY_DATA_USE_DATASOURCE_V2", "0").lower() in ("1", "true")  # as Ray reads it


def datasets(recipe, m, t: Train, stream: Stream) -> dict:
    """{'train', 'valid'}: the table's rows of each split, read and decoded as streaming tasks
    (`decode_cpus` each). Nothing is read until a worker iterates its shard."""
    import ray.data
    from ray.data.expressions import col

    ctx = ray.data.DataContext.get_current()   # datasets carry it to the workers
    ctx.enable_progress_bars = ctx.print_on_execution_start = False  # the epoch table is the progress
    ctx.use_datasource_v2 = use_datasource_v2()
    # the V1 reader logs its size estimates at INFO on the driver, two lines per split
    logging.getLogger("ray.data._internal.datasource.parquet_datasource").setLevel(logging.WARNING)
    decode = functools.partial(decode_rows, recipe, stream.processor, m)
    return {name: ray.data.read_parquet(stream.table, num_cpus=t.decode_cpus)
            .filter(expr=col("is_valid") == valid)
            # a training batch's worth at a time: blocks reach the workers as they are decoded
            .map_batches(decode, batch_format="pandas", batch_size=t.bs, num_cpus=t.decode_cpus)
            for name, valid in (("train", False), ("valid", True))}


DATA_WAITS: list[dict] = []  # this worker process's DataWaits rows (worker_stats returns them)


class DataWaits:
    """Where a rank's pass over its shard spends its time: seconds until the first batch (Ray Data
    execution start-up plus the first decoded block), seconds blocked waiting for batches in all,
    and the pass's wall seconds (the rest is the training or scoring step). One row per pass;
    `source` is `stream` (a Ray Data execution) or `cache` (the kept validation batches)."""

    def __init__(self, split: str, epoch: int, source: str):
        self.row = {"split": split, "epoch": epoch, "source": source, "batches": 0,
                    "first_batch_s": None, "wait_s": 0.0, "seconds": 0.0}
        DATA_WAITS.append(self.row)

    def timed(self, batches):
        t0 = t = time.perf_counter()
        for b in batches:
            now = time.perf_counter()
            if self.row["first_batch_s"] is None:
                self.row["first_batch_s"] = now - t0
            self.row["wait_s"] += now - t
            self.row["batches"] += 1
            yield b
            t = time.perf_counter()
        self.row["wait_s"] += time.perf_counter() - t
        self.row["seconds"] = time.perf_counter() - t0


def held_bytes(batch: tuple) -> int:
    """Bytes a batch keeps alive: its tensors' whole storages (a view pins all of its block)."""
    return sum(x.untyped_storage().nbytes() for x in batch)


class Ahead:
    """The next epoch's pass over a train shard, started in a thread as soon as this epoch's pass
    ends: its Ray Data execution starts up (the seconds before its first batch) while the rank
    validates and reports. Same seed, same shard: only the time it starts differs."""

    def __init__(self, epoch: int, batches):
        import threading

        self.epoch, self.it = epoch, iter(batches)
        self.first, self.error, self.empty = None, None, False
        self.thread = threading.Thread(target=self._fetch, name=f"epoch-{epoch}-ahead", daemon=True)
        self.thread.start()

    def _fetch(self) -> None:
        try:
            self.first = next(self.it)
        except StopIteration:
            self.empty = True
        except BaseException as e:  # noqa: BLE001 - raised where the batches are consumed
            self.error = e

    def batches(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        if not self.empty:
            yield self.first
            yield from self.it


class ShardBatches:
    """One rank's batches from Ray Data (Kind.batches' role on the streaming path).

    train: the rank's share of the split (Ray Train splits its rows equally, so every rank takes
    the same number of steps; a kind that makes its own batches from them may give ranks
    different numbers, and then `agree` stops them together), reshuffled each epoch in a local
    buffer seeded by (seed, epoch).
    valid: rank 0 scores every validation row and the other ranks none (the metric sums are
    added over ranks), so no row is dropped or counted twice. Every Ray Data execution costs a
    fixed start-up (seconds: tasks scheduled, decode processes started), so rank 0 keeps the
    decoded validation batches of its first complete pass when they fit in `cache_bytes`
    (`train.valid_cache_mb`) and another epoch follows, and scores every later epoch from them:
    the same tensors in the same order as a stream would give (`preserve_order`). A split
    larger than that is streamed every epoch; what is kept never exceeds `cache_bytes`. The
    train shard's next epoch is started as soon as a train pass ends (`Ahead`), so its start-up
    overlaps validation and the epoch's report; a validation pass that streams is started once
    its epoch's train pass has its first batch (`siblings`: the rank's ShardBatches by split),
    so its start-up overlaps training, not the train execution's own start-up."""

    def __init__(self, split: str, rows: int, bs: int, rank: int, world: int, seed: int,
                 train: bool, buffer: int, cache_bytes: int = 0, last_epoch: int = 0,
                 clock: dict | None = None, siblings: dict | None = None, chunk: int = 0,
                 regroup=None, steps: int | None = None, agree=None):
        self.split, self.seed, self.train, self.buffer = split, seed, train, buffer
        self.chunk, self.regroup = chunk, regroup  # Kind.stream_chunk, Kind.stream_batches
        self.agree = agree  # all_ranks_have(): train passes whose ranks may run out apart
        self.siblings = siblings if siblings is not None else {}
        self.siblings[split] = self
        self.cache_bytes, self.last_epoch = cache_bytes, last_epoch
        self.clock = clock if clock is not None else {"epoch": 0}  # the latest train pass's epoch
        self.cache: list[tuple] | None = None
        self.ahead: Ahead | None = None
        if train:
            self.bs = max(1, bs // world)
            self.n = even_steps(rows, bs, world) if steps is None else steps  # Kind.stream_steps
        else:
            self.bs = bs
            self.n = -(-rows // bs) if rank == 0 else 0

    def __len__(self) -> int:
        return self.n

    def __call__(self, epoch: int = 0):
        if self.train:
            self.clock["epoch"] = epoch
        else:
            epoch = self.clock["epoch"]  # the Learner validates after each train pass
        if self.n == 0:
            return
        if self.cache is not None:
            yield from DataWaits(self.split, epoch, "cache").timed(iter(self.cache))
            return
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead.epoch != epoch:  # not the epoch it was started for (the
            ahead = None                                # Learner runs epochs in order: never)
        keep: list[tuple] | None = ([] if not self.train and self.cache_bytes > 0
                                    and epoch < self.last_epoch else None)
        size = 0
        waits = DataWaits(self.split, epoch, "stream" if ahead is None else "stream, started ahead")
        source = ahead.batches() if ahead is not None else self.stream(epoch)
        if self.train and self.agree is not None:
            source = together(source, self.agree)
        for batch in waits.timed(source):
            if keep is not None:
                size += held_bytes(batch)
                if size <= self.cache_bytes:
                    keep.append(batch)
                else:
                    keep = None  # too big to keep: this split streams every epoch
            yield batch
            if self.train and waits.row["batches"] == 1 and "valid" in self.siblings:
                # after the first batch: not while this pass's own execution starts up
                self.siblings["valid"].start_ahead(epoch)
        if keep is not None:  # a complete pass (an abandoned one never reaches here)
            self.cache = keep
        if self.train and epoch < self.last_epoch:
            self.start_ahead(epoch + 1)

    def start_ahead(self, epoch: int) -> None:
        """Start this rank's pass of `epoch` now, in a thread, unless it has no batches, is
        scored from the kept ones, or is already started."""
        if self.n and self.cache is None and self.ahead is None:
            self.ahead = Ahead(epoch, self.stream(epoch))

    def stream(self, epoch: int):
        """A new pass over this rank's shard, one Ray Data execution: its batches as tuples."""
        import ray.train

        pull = self.bs * max(self.chunk, 1)  # rows per batch Ray Data hands over
        shuffle = ({"local_shuffle_buffer_size": shuffle_rows(self.buffer, pull),
                    "local_shuffle_seed": self.seed * 1_000_003 + epoch} if self.train else {})
        shard = ray.train.get_dataset_shard(self.split)
        if not self.chunk:
            for b in shard.iter_torch_batches(batch_size=pull, drop_last=self.train, **shuffle):
                yield tuple(b[f"t{i}"] for i in range(len(b)))
            return
        # the kind makes the batches from the chunks it pulls (text: grouped by length, padded per
        # batch; language models: rows filled with whole texts); the chunks come in one order per
        # seed and epoch, so one generator replays them
        rng = np.random.default_rng([self.seed, epoch]) if self.train else None
        yield from self.regroup(shard.iter_batches(batch_size=pull, batch_format="numpy", **shuffle),
                                self.bs, rng)


def together(batches, agree):
    """A rank's batches while every rank has one. Ranks agree before each step (`agree(have)`:
    True when all have a batch), so when one runs out the others stop at the same step (DDP
    needs every rank in every step; a rank left alone waits forever). The rest of a pass that
    stopped early is read to its end, unused, so its Ray Data execution finishes."""
    it = iter(batches)
    for batch in it:
        if not agree(True):
            for _ in it:
                pass
            return
        yield batch
    agree(False)


def all_ranks_have(device):
    """`together`'s agreement over the Ray Train worker group: a MIN all_reduce of one flag."""
    import torch.distributed as dist

    def agree(have: bool) -> bool:
        flag = torch.tensor([int(have)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return agree


def shuffle_rows(buffer: int, bs: int) -> int:
    """The local shuffle buffer a rank asks Ray Data for: `train.shuffle_buffer`, at least two
    batches. Ray Data 2.60's ShufflingBatcher refills its buffer only once fewer than half of it
    are left, so with a buffer under two batches it yields a short batch mid-epoch even with
    drop_last (800 rows in 27 blocks, bs 64, buffer 64: 13 batches, one of 46 rows, 760 rows in
    all): ranks would take different numbers of steps. Ray rounds a buffer under one batch up to
    one itself; more rows only shuffle more."""
    return max(buffer, 2 * bs)


def shard_batches(t: Train):
    """program.Hooks.batches for the streaming path (Kind.batches' signature). The train and
    valid sources share the epoch: the Learner calls valid_batches() without it."""
    clock, siblings = {"epoch": 0}, {}

    def batches(recipe, processor, df, m, bs, rank, world, seed, train):
        import ray.train.torch

        kind = recipe.kind
        # the run's last global epoch: the kind's plan (ULMFiT's unfreezing steps have their own)
        last = sum(phase.epochs for phase in kind.plan(m, t)) - 1
        rows, chunk = len(kind.usable(df)), kind.stream_chunk(m)
        # batches the kind makes itself may differ in number between ranks (a language model's
        # texts fill its rows at their own pace): ranks agree at every step
        agree = all_ranks_have(ray.train.torch.get_device()) if train and chunk and world > 1 else None
        return ShardBatches("train" if train else "valid", rows, bs, rank, world, seed, train,
                            t.shuffle_buffer, cache_bytes=int(t.valid_cache_mb * 2 ** 20),
                            last_epoch=last, clock=clock, siblings=siblings, chunk=chunk,
                            regroup=functools.partial(kind.stream_batches, processor, m),
                            steps=kind.stream_steps(processor, m, rows, bs, world) if train else None,
                            agree=agree)
    return batches


# ----------------------------------------------------------------------------- the worker loop

def worker_stats(loop_started: float) -> dict:
    """What the driver cannot see of a worker: its peak memory, threads, loop timestamps, and the
    project modules it imported (the code-deps audit checks them against dvc.yaml)."""
    import resource
    return {"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
            "rss_now_mb": rss_parts(),
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "loop_started": loop_started, "loop_ended": time.time(),
            "data_waits": [dict(r) for r in DATA_WAITS],  # the streaming path's passes (DataWaits)
            "modules": sorted(m for m in sys.modules if m == "coursepipe" or m.startswith("coursepipe."))}


def rss_parts() -> dict:
    """This process's resident memory now, by kind (Linux): anonymous (its own heap), file-backed
    (libraries), shared memory (Ray's object store pages it has mapped, e.g. Ray Data blocks)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    keys = {"RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    return {keys[k]: int(v.split()[0]) / 1024 for k, v in (l.split(":", 1) for l in lines if ":" in l)
            if k in keys}


def train_loop_per_worker(config: dict) -> dict | None:
    started = time.time()  # wall clock, so the driver can split start-up from teardown
    DATA_WAITS.clear()  # a restarted worker group may reuse this process
    import ray.train
    import ray.train.torch

    recipe, m, t = config["recipe"], config["model"], config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def reduce(x: torch.Tensor) -> torch.Tensor:
        if world > 1:
            torch.distributed.all_reduce(x)
        return x

    hooks = program.Hooks(rank=rank, world=world, device=ray.train.torch.get_device(), reduce=reduce,
                          wrap=ray.train.torch.prepare_model, resume=resume_from_ray,
                          report=ray_report(rank), show=rank == 0 and config.get("verbose", True))
    if config.get("processor") is not None:  # the streaming path: rows come from Ray Data shards
        hooks.processor, hooks.batches = config["processor"], shard_batches(t)
        # Ray Train 2.60 creates the train split's SplitCoordinator actor at the first call
        # (all ranks, a barrier); made now, its process starts while the model is built
        ray.train.get_dataset_shard("train")
    if config.get("upstream"):  # a path, not the weights: the config is pickled once per worker
        hooks.upstream = torch.load(config["upstream"], map_location="cpu", weights_only=True)
    try:
        out = program.train(recipe, m, t, config["frame"], hooks)
    except Exception as e:
        if not deterministic(e):
            raise  # Ray restarts the worker group (FailureConfig.max_failures) from the last checkpoint
        # Returned, not raised, so Ray does not retry it; every rank fails alike (same config,
        # data and checkpoint), so none is left waiting in a collective.
        return {"error": one_line(e), "traceback": traceback.format_exc()}
    checksums = rank_checksums(out.parts.model, world)
    if rank == 0:
        return {"history": out.history, "train_seconds": out.train_seconds,
                "start_epoch": out.start_epoch, "worker": worker_stats(started),
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


def fit(recipe, m, t: Train, frame: pd.DataFrame, storage: str, run_name: str,
        verbose: bool = True, stream: Stream | None = None, upstream: str | None = None) -> FitResult:
    """Train `recipe`'s model section m with train section t on the prepared `frame` (with an
    is_valid column) through Ray Train; with `stream`, the frame lacks the heavy columns and the
    workers read their rows from Ray Data. `upstream`: the model file the model starts from
    (Kind.start_from), on a path every worker's node sees, as the prepared table's."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    t0 = time.perf_counter()
    init_ray()
    data = {}
    if stream is not None:
        from ray.data import ExecutionOptions
        decode_room(t, ray.cluster_resources().get("CPU", 0.0))
        # preserve_order: with one worker an epoch's rows arrive in the same order on a rerun
        data = {"datasets": datasets(recipe, m, t, stream),
                "dataset_config": ray.train.DataConfig(
                    datasets_to_split=["train"],
                    execution_options=ExecutionOptions(preserve_order=True))}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"recipe": recipe, "model": m, "train": t, "frame": frame, "verbose": verbose,
                           "processor": stream.processor if stream is not None else None,
                           "upstream": upstream},
        **data,
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.checkpoints_kept),
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise TrainingError(f"Ray run {run_name} failed after {t.max_failures} worker-group "
                            f"restart(s): {one_line(result.error)}") from result.error
    ret = result.return_value or {}
    if "error" in ret:
        err = TrainingError(f"Ray run {run_name} stopped (not retried: it would fail the same "
                            f"way): {ret['error']}")
        err.worker_traceback = ret["traceback"]  # the CLI writes it to its log
        raise err
    if result.checkpoint is None:
        raise TrainingError(f"Ray run {run_name} finished without a checkpoint")
    state = load_checkpoint(result.checkpoint)
    return FitResult(state=state, history=list(state["history"]),
                     train_seconds=float(ret.get("train_seconds", 0.0)),
                     wall_seconds=time.perf_counter() - t0, run_name=run_name, storage=storage,
                     worker=dict(ret.get("worker", {})), start_epoch=int(ret.get("start_epoch", 0)),
                     rank_checksums=list(ret.get("rank_checksums", [])))
