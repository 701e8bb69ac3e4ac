"""train: prepared table -> Ray Train (TorchTrainer) -> models/<recipe>/model.pt + history CSV.

Refuses to train unless reports/<recipe>/validation.json passed for exactly this prepared table
(its sha256). Reads params: model, train. Where checkpoints go (`ray_storage`) is the door's runtime argument,
like RAY_ADDRESS: it changes where a run is kept, not what it computes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from coursepipe import config
from coursepipe.config import RecipeConfig
from coursepipe.contract import Recipe
from coursepipe.io import atomic_path, file_digest, write_text
from coursepipe.paths import Paths
from coursepipe.stages import prepare

MODEL_FILE = "model.pt"
SUMMARY_FILE = "train.json"


@dataclass
class TrainResult:
    run_name: str
    epochs_run: int
    history: list[dict]
    train_seconds: float      # rank 0's epoch loop
    startup_seconds: float    # everything else in the fit: Ray start, workers, teardown
    rank_checksums: list      # sum |w| per rank after training: equal when the ranks agree
    worker: dict              # rank 0's stats (peak RSS, threads, modules imported)


@dataclass
class Bundle:
    """A trained model as models/<recipe>/model.pt holds it."""
    model: torch.nn.Module    # in eval mode, on CPU
    processor: dict
    model_config: object      # the model section it was trained with (typed by the recipe)
    train_config: dict        # the train section it was trained with
    history: list[dict]
    run_name: str | None


def run_name(cfg: RecipeConfig, data_digest: str, upstream_digest: str | None = None) -> str:
    """Same model + train params, the same prepared table and the same starting model -> the same
    Ray run name -> resume; anything else -> a fresh run (the table's digest stands for the source
    and prepare params)."""
    blob = json.dumps({"model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train),
                       "data": data_digest, **({"upstream": upstream_digest} if upstream_digest else {})},
                      sort_keys=True, default=str)
    return f"{cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def history_csv(history: list[dict]) -> str:
    """Per-epoch metrics, one row per epoch, for `dvc plots`."""
    buf = io.StringIO()
    pd.DataFrame(history).to_csv(buf, index=False, float_format="%.6g")
    return buf.getvalue()


class NotValidated(RuntimeError):
    """The prepared table has no passing validation report: nothing is trained on it."""


def check_validated(paths: Paths, recipe: str, table_digest: str) -> None:
    """Train only on the exact table the validate stage passed (by its sha256)."""
    report = paths.validation_report(recipe)
    rel = report.relative_to(paths.root)
    if not report.is_file():
        raise NotValidated(f"{rel} is missing: run the validate stage before training {recipe}")
    try:
        rep = json.loads(report.read_text())
    except ValueError:
        raise NotValidated(f"{rel} is not valid JSON: run the validate stage again") from None
    if rep.get("table_sha256") != table_digest:
        raise NotValidated(f"{rel} is for another prepared table than prepared/{recipe}/"
                           f"{prepare.TABLE}: run the validate stage again")
    if not rep.get("success"):
        raise NotValidated(f"validation of prepared/{recipe} failed ({rep.get('failed')} of "
                           f"{rep.get('evaluated')} rules; see {rel}): refusing to train on it")


def load_frame(cfg: RecipeConfig, recipe: Recipe, paths: Paths, upstream: Path | None = None):
    """(frame, stream): the whole prepared table for the memory path; for `data_path: ray_data`
    the table without its heavy columns and a ray_train.Stream holding the processor made here
    (from the `upstream` model's bundle when the recipe starts from one, as the memory path's
    workers make it), so neither the driver nor a worker ever holds what Ray Data decodes."""
    from coursepipe.distributed.ray_train import Stream

    if cfg.train.data_path == "memory":
        return prepare.load(paths, cfg.name), None
    kind = recipe.kind
    heavy = kind.heavy_columns(cfg.model)
    if not heavy:
        raise config.ConfigError(f"recipes.{cfg.name}.train.data_path: ray_data needs a kind with a "
                                 f"streaming path; kind {kind.name} has none for a "
                                 f"{type(cfg.model).__name__} model section (use memory)")
    frame = prepare.load(paths, cfg.name, without=heavy)
    needs = kind.processor_columns(cfg.model)  # e.g. pixels for the data's own statistics
    train_rows = (prepare.load(paths, cfg.name, without=tuple(c for c in heavy if c not in needs), valid=False)
                  if needs else frame[~frame["is_valid"]])
    table = str((paths.prepared(cfg.name) / prepare.TABLE).resolve())
    processor = (kind.fit_processor(recipe, train_rows, cfg.model) if upstream is None else
                 kind.processor_from(recipe, train_rows, cfg.model, read_bundle(upstream)))
    return frame, Stream(table=table, processor=processor)


def run(cfg: RecipeConfig, recipe: Recipe, paths: Paths, storage: str, verbose: bool = True) -> TrainResult:
    from coursepipe import locks
    from coursepipe.distributed import ray_train  # Ray is imported only when training

    recipe.kind.prefetch(cfg.model)  # e.g. pretrained weights: fail here, in one line, not in a worker
    digest = file_digest(paths.prepared(cfg.name) / prepare.TABLE)
    check_validated(paths, cfg.name, digest)
    upstream = upstream_model(paths, cfg)
    frame, stream = load_frame(cfg, recipe, paths, upstream)
    name = run_name(cfg, digest, file_digest(upstream) if upstream else None)
    lock = locks.run_lock(storage, name)  # two roots sharing ray_storage must not train one run twice
    with locks.hold(lock, f"Ray run {name}") if lock else contextlib.nullcontext():
        fit = ray_train.fit(recipe, cfg.model, cfg.train, frame, storage=storage, run_name=name,
                            verbose=verbose, stream=stream,
                            upstream=str(upstream) if upstream else None)
    save_bundle(paths, cfg, fit.state["model"], fit.state["processor"], fit.history, summary={
        "run_name": name, "storage": storage, "epochs": len(fit.history),
        "train_seconds": round(fit.train_seconds, 3),
        "startup_seconds": round(fit.wall_seconds - fit.train_seconds, 3),
        "worker_max_rss_mb": round(fit.worker.get("max_rss_mb", 0.0), 1),
        "worker_rss_now_mb": {k: round(v, 1) for k, v in fit.worker.get("rss_now_mb", {}).items()}})
    return TrainResult(run_name=name, epochs_run=len(fit.history), history=fit.history,
                       train_seconds=fit.train_seconds,
                       startup_seconds=fit.wall_seconds - fit.train_seconds,
                       rank_checksums=fit.rank_checksums, worker=fit.worker)


def upstream_model(paths: Paths, cfg: RecipeConfig) -> Path | None:
    """The model file of the recipe this one starts from (`starts_from: models/<r>`), or None."""
    if cfg.upstream is None:
        return None
    path = paths.model(cfg.upstream) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"recipes.{cfg.name}.starts_from: {path.relative_to(paths.root)} "
                                f"is missing: train {cfg.upstream} first (dvc repro train@{cfg.name} "
                                f"does it)")
    return path


def read_bundle(path: Path) -> dict:
    """A model.pt as saved by save_bundle (weights_only: a file from a shared remote runs no code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many types
        raise ValueError(f"{path}: not a model bundle of this project ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


def save_bundle(paths: Paths, cfg: RecipeConfig, state_dict: dict, processor: dict,
                history: list[dict], summary: dict) -> Path:
    """Write models/<recipe>/ (weights + preprocessing + the sections trained with) and the
    history CSV atomically. Only tensors and plain values: it loads with weights_only=True."""
    with atomic_path(paths.model(cfg.name)) as out:
        out.mkdir()
        torch.save({"recipe": cfg.name, "model_config": dataclasses.asdict(cfg.model),
                    "train_config": dataclasses.asdict(cfg.train),
                    "state_dict": state_dict, "processor": processor, "history": history,
                    "run_name": summary.get("run_name")}, out / MODEL_FILE)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_text(paths.history(cfg.name), history_csv(history))
    return paths.model(cfg.name)


def load_model(paths: Paths, recipe: Recipe) -> Bundle:
    """The trained model from models/<recipe>/, rebuilt from the model section it was trained
    with (not today's params: evaluate and export describe the model as it is)."""
    path = paths.model(recipe.name) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the train stage first")
    raw = read_bundle(path)
    m = config.build(recipe.model_config, raw["model_config"], f"{path}:model_config", located=False)
    model = recipe.kind.build_model(recipe, raw["processor"], m)
    model.load_state_dict(raw["state_dict"])
    return Bundle(model=model.eval(), processor=raw["processor"], model_config=m,
                  train_config=raw.get("train_config", {}), history=raw["history"],
                  run_name=raw.get("run_name"))
