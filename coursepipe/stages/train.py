"""train: prepared table -> Ray Train (TorchTrainer) -> models/<recipe>/model.pt + history CSV."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from coursepipe.config import RecipeConfig
from coursepipe.io import atomic_path, write_text
from coursepipe.paths import Paths
from coursepipe.recipes import get_recipe
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


def run_name(cfg: RecipeConfig, data_digest: str) -> str:
    """Same params + same data -> same Ray run name -> resume; anything else -> a fresh run."""
    blob = json.dumps({"source": cfg.source, "prepare": dataclasses.asdict(cfg.prepare),
                       "model": dataclasses.asdict(cfg.model), "train": dataclasses.asdict(cfg.train),
                       "data": data_digest}, sort_keys=True, default=str)
    return f"{cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def history_csv(history: list[dict]) -> str:
    """Per-epoch metrics, one row per epoch, for `dvc plots`."""
    buf = io.StringIO()
    pd.DataFrame(history).to_csv(buf, index=False, float_format="%.6g")
    return buf.getvalue()


def run(cfg: RecipeConfig, paths: Paths, storage: str, verbose: bool = True) -> TrainResult:
    from coursepipe.distributed import ray_train  # Ray is imported only when training

    prefetch = getattr(get_recipe(cfg.name), "prefetch", None)
    if prefetch is not None:  # e.g. pretrained weights: fail here, in one line, not in a worker
        prefetch(cfg)
    frame = prepare.load(paths, cfg.name)
    name = run_name(cfg, file_digest(paths.prepared(cfg.name) / prepare.TABLE))
    fit = ray_train.fit(cfg, frame, storage=storage, run_name=name, verbose=verbose)
    save_bundle(paths, cfg, fit.state["model"], fit.state["processor"], fit.history, summary={
        "run_name": name, "storage": storage, "epochs": len(fit.history),
        "train_seconds": round(fit.train_seconds, 3),
        "startup_seconds": round(fit.wall_seconds - fit.train_seconds, 3),
        "worker_max_rss_mb": round(fit.worker.get("max_rss_mb", 0.0), 1)})
    return TrainResult(run_name=name, epochs_run=len(fit.history), history=fit.history,
                       train_seconds=fit.train_seconds,
                       startup_seconds=fit.wall_seconds - fit.train_seconds,
                       rank_checksums=fit.rank_checksums)


def save_bundle(paths: Paths, cfg: RecipeConfig, state_dict: dict, processor: dict,
                history: list[dict], summary: dict) -> Path:
    """Write models/<recipe>/ (weights + preprocessing + config) and the history CSV atomically."""
    with atomic_path(paths.model(cfg.name)) as out:
        out.mkdir()
        torch.save({"recipe": cfg.name, "model_config": dataclasses.asdict(cfg.model),
                    "state_dict": state_dict, "processor": processor, "history": history,
                    "run_name": summary.get("run_name")}, out / MODEL_FILE)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_text(paths.history(cfg.name), history_csv(history))
    return paths.model(cfg.name)


def load_model(paths: Paths, cfg: RecipeConfig) -> tuple[torch.nn.Module, dict, dict]:
    """(model in eval mode on CPU, processor state, the saved bundle) from models/<recipe>/."""
    path = paths.model(cfg.name) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the train stage first")
    bundle = torch.load(path, map_location="cpu", weights_only=False)
    recipe = get_recipe(cfg.name)
    model = recipe.build_model(bundle["processor"], recipe.ModelConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in bundle["model_config"].items()}))
    model.load_state_dict(bundle["state_dict"])
    return model.eval(), bundle["processor"], bundle
