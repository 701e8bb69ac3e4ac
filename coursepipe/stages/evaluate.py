"""evaluate: trained model + validation rows -> metrics/<recipe>.json and plots.

A recipe module may define `evaluate(model, processor, valid_df, bs, plots_dir, cfg) -> metrics`
(regression, language models, ...); otherwise the classification evaluation below runs, built
only from the recipe's `tensors`, `CLASSES` and `loss_func`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from coursepipe.config import RecipeConfig
from coursepipe.io import write_bytes, write_json, write_text
from coursepipe.learn import interpret
from coursepipe.paths import Paths
from coursepipe.recipes import get_recipe
from coursepipe.stages import prepare, train

CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_CSV = "confusion_matrix.csv"


@dataclass
class EvaluateResult:
    metrics: dict
    metrics_path: Path
    plot_path: Path | None   # the main picture (confusion matrix for classifiers)


def valid_rows(paths: Paths, recipe: str) -> pd.DataFrame:
    """The prepared table's validation split."""
    frame = prepare.load(paths, recipe)
    valid = frame[frame["is_valid"]].reset_index(drop=True)
    if valid.empty:
        raise ValueError(f"{paths.prepared(recipe)}: no validation rows (is_valid is all False)")
    return valid


@torch.no_grad()
def predict_logits(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], bs: int) -> torch.Tensor:
    """Logits for every row, `bs` rows at a time (bounded memory on any validation size)."""
    model.eval()
    n = len(inputs[0])
    return torch.cat([model(*(x[i:i + bs] for x in inputs)).float() for i in range(0, n, bs)])


def mean_loss(loss_func, logits: torch.Tensor, y: torch.Tensor, bs: int) -> float:
    """Row-weighted mean of a batch-mean loss (CrossEntropyLoss reduces by mean)."""
    total = sum(float(loss_func(logits[i:i + bs], y[i:i + bs])) * len(y[i:i + bs])
                for i in range(0, len(y), bs))
    return total / max(len(y), 1)


def evaluate(model: torch.nn.Module, recipe, processor: dict, df: pd.DataFrame, bs: int):
    """(metrics dict, actual indices, predicted indices) for the rows of `df`."""
    *inputs, y = recipe.tensors(processor, df)
    logits = predict_logits(model, tuple(inputs), bs)
    predicted = logits.argmax(1).numpy()
    metrics = interpret.classification_metrics(y.numpy(), predicted, recipe.CLASSES)
    metrics["valid_loss"] = mean_loss(recipe.loss_func(), logits, y, bs)
    return metrics, y.numpy(), predicted


def classification(model, recipe, processor: dict, valid: pd.DataFrame, bs: int, plots: Path,
                   cfg: RecipeConfig) -> tuple[dict, Path]:
    """Accuracy, error rate, loss and per-class counts; confusion matrix PNG + CSV."""
    metrics, actual, predicted = evaluate(model, recipe, processor, valid, bs)
    cm = interpret.confusion_matrix(actual, predicted, len(recipe.CLASSES))
    write_bytes(plots / CONFUSION_PNG, interpret.plot_confusion(
        cm, recipe.CLASSES, title=f"{cfg.name}: confusion matrix (n={len(actual)})"))
    write_text(plots / CONFUSION_CSV, interpret.confusion_csv(actual, predicted, recipe.CLASSES))
    return metrics, plots / CONFUSION_PNG


def run(cfg: RecipeConfig, paths: Paths) -> EvaluateResult:
    recipe = get_recipe(cfg.name)
    model, processor, _ = train.load_model(paths, cfg)
    # the training loop's validation batch size: evaluation has no gradients to hold
    bs = cfg.train.bs * 4
    evaluate_fn = getattr(recipe, "evaluate", classification)
    metrics, plot = evaluate_fn(model, recipe, processor, valid_rows(paths, cfg.name), bs,
                                paths.plots(cfg.name), cfg)
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
    # metrics last: dvc sees a complete set of plots whenever the metrics file is new
    write_json(paths.metrics(cfg.name), metrics)
    return EvaluateResult(metrics=metrics, metrics_path=paths.metrics(cfg.name), plot_path=plot)
