"""Tabular classification (lesson 4's tabular_learner): categorical embeddings + continuous inputs.

The recipe's schema names the columns: categorical ones in `categories`, continuous ones in
`ranges`, the target with its fixed `classes`; the model section picks which of them feed the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coursepipe.config import ConfigError, Section
from coursepipe.contract import Evaluation, Kind


@dataclass(frozen=True)
class TabularModel(Section):
    """fastai's TabularModel: embeddings + batch-normed continuous inputs -> MLP -> classes."""
    cat_names: tuple[str, ...]      # categorical columns (schema.categories) fed as embeddings
    cont_names: tuple[str, ...]     # continuous columns (schema.ranges), FillMissing + Normalize
    layers: tuple[int, ...]         # hidden widths
    ps: tuple[float, ...]           # dropout after each hidden layer
    emb_drop: float                 # dropout on the concatenated embeddings
    use_bn: bool

    def __post_init__(self):
        if len(self.ps) != len(self.layers):
            raise ConfigError(f"ps has {len(self.ps)} entries for {len(self.layers)} layers")


class TabularClassification(Kind):
    name = "tabular_classification"
    portable = "coursepipe.export.portable_tabular"
    model_configs = (TabularModel,)

    def check(self, recipe, cfg) -> None:
        s, m = recipe.schema, cfg.model
        for col in m.cat_names:
            if col not in s.categories:
                raise ConfigError(f"model.cat_names: {col!r} is not a categorical column of "
                                  f"{recipe.name} (schema: {sorted(s.categories)})")
        for col in m.cont_names:
            if col not in s.ranges:
                raise ConfigError(f"model.cont_names: {col!r} is not a continuous column of "
                                  f"{recipe.name} (schema: {sorted(s.ranges)})")
        if not s.classes:
            raise ConfigError(f"model: a tabular classifier needs schema.classes for {s.target!r}")

    def fit_processor(self, recipe, train, m: TabularModel) -> dict:
        from coursepipe.data.tabular import fit_processor
        return fit_processor(train, m.cat_names, m.cont_names, recipe.schema.target, recipe.schema.classes)

    def tensors(self, recipe, processor: dict, df) -> tuple:
        """(x_cat, x_cont, y) tensors for the rows of df."""
        from coursepipe.data.tabular import to_tensors
        return to_tensors(processor, df)

    def build_model(self, recipe, processor: dict, m: TabularModel):
        from coursepipe.data.tabular import cardinalities
        from coursepipe.models.tabular import TabularModel as Net
        return Net(cardinalities(processor), len(processor["cont_names"]), len(processor["classes"]),
                   layers=m.layers, ps=m.ps, emb_drop=m.emb_drop, use_bn=m.use_bn)

    def splitter(self, m, model) -> list[list]:
        from coursepipe.models.tabular import splitter
        return splitter(model)

    def loss_func(self, m):
        import torch
        return torch.nn.CrossEntropyLoss()

    def metrics(self, m) -> dict:
        from coursepipe.learn.loop import accuracy
        return {"accuracy": accuracy}

    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """Accuracy, error rate, loss and per-class counts; confusion matrix PNG + CSV."""
        from coursepipe.learn.interpret import CONFUSION_PNG, report_classification

        *inputs, y = self.tensors(run.recipe, run.processor, run.valid)
        metrics, _, _ = report_classification(run, tuple(inputs), y, run.processor["classes"],
                                              self.loss_func(run.model_config))
        return metrics, run.plots / CONFUSION_PNG

    def card(self, recipe, processor: dict) -> dict:
        return {"target": processor["target"], "classes": list(processor["classes"]),
                "input_columns": {"categorical": list(processor["cat_names"]),
                                  "continuous": list(processor["cont_names"])}}
