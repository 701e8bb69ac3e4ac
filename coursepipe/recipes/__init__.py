"""Recipe registry: one module per course task, imported only when asked for.

A recipe module declares, and nothing else (see recipes/adult.py):
  KIND, ModelConfig (frozen dataclass: the params.yaml `model:` section)
  synthesize(rows, seed) -> bytes        the offline sample archive, in the course's layout
  read_raw(extracted_dir) -> DataFrame, normalise(df) -> DataFrame      used by prepare
  fit_processor(train_df, model_cfg) -> dict (JSON-able; travels into checkpoints and the export)
  tensors(processor, df) -> (inputs..., target)
  build_model(processor, model_cfg), splitter(model) -> param groups, loss_func(), metrics()
  schema for the validation suite: COLUMNS, CATEGORIES, RANGES, TARGET (+ CLASSES if classifying);
  optional extra_expectations(validate_cfg) -> [(gx expectation type, kwargs), ...]
Optional hooks:
  split(df, cfg) -> bool mask of validation rows (default: seeded random prepare.valid_pct)
  after_split(df, cfg) -> df   annotate rows once is_valid is known (e.g. duplicates across splits)
  batches(recipe, processor, df, bs, rank, world, seed, train, cfg) -> callable(epoch) -> batches
  prefetch(cfg) -> None         driver-side work before Ray starts (download pretrained weights)
  callbacks(cfg) -> extra training-loop callbacks (e.g. reset an RNN's state each epoch)
  evaluate(model, recipe, processor, valid_df, bs, plots_dir, cfg) -> (metrics, main_plot_path)
  PORTABLE = "coursepipe.export.<module>"   standalone predict module for the export
"""
from __future__ import annotations

import importlib
from types import ModuleType

# name -> module. A recipe module declares ModelConfig, its data layout and its model parts.
RECIPES: dict[str, str] = {
    "adult": "coursepipe.recipes.adult",
    "human_numbers": "coursepipe.recipes.human_numbers",
    "movielens": "coursepipe.recipes.movielens",
    "mnist": "coursepipe.recipes.mnist",
    "pets": "coursepipe.recipes.pets",
    "own_images": "coursepipe.recipes.own_images",
}


def get_recipe(name: str) -> ModuleType:
    if name not in RECIPES:
        from coursepipe.config import ConfigError
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {sorted(RECIPES)}")
    return importlib.import_module(RECIPES[name])
