"""evaluate: trained model + validation rows -> metrics/<recipe>.json and plots/<recipe>/.

The recipe's kind scores the model (classification report, MSE and item maps, next-token
accuracy, ...) and draws its pictures. Reads params: evaluate (the model is rebuilt from the
model section stored with it, not from today's params).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from coursepipe.config import RecipeConfig
from coursepipe.contract import Evaluation, Recipe
from coursepipe.io import write_json
from coursepipe.paths import Paths
from coursepipe.stages import prepare, train


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


def run(cfg: RecipeConfig, recipe: Recipe, paths: Paths) -> EvaluateResult:
    bundle = train.load_model(paths, recipe)
    metrics, plot = recipe.kind.evaluate(Evaluation(
        name=cfg.name, recipe=recipe, model=bundle.model, processor=bundle.processor,
        model_config=bundle.model_config, config=cfg.evaluate, valid=valid_rows(paths, cfg.name),
        plots=paths.plots(cfg.name)))
    metrics = {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
    # metrics last: dvc sees a complete set of plots whenever the metrics file is new
    write_json(paths.metrics(cfg.name), metrics)
    return EvaluateResult(metrics=metrics, metrics_path=paths.metrics(cfg.name), plot_path=plot)
