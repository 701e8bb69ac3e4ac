"""The recipe contract: a course task (Recipe) declares its data; its kind of task (Kind) does the rest.

A *Recipe* is one typed object per course task (`RECIPE` in coursepipe/recipes/<name>.py): where
its data comes from and how it is laid out (synthesize, read_raw, normalise, split), the schema of
the prepared table, and the type of its `model:` section. Required fields are required, optional
ones have explicit defaults; nothing is probed with getattr.

A *Kind* is what every recipe of one kind of task shares (tabular classification, collaborative
filtering, language model, image classification, ...): how a prepared table becomes tensors and
batches, the model it builds from the model section, loss, metrics, training callbacks, the
evaluation and its pictures, the portable predict module and the export's axes. A Kind subclass
that defines a public name Kind does not have fails at import (a misspelt method never silently
falls back to a default).

Stages receive the recipe object from their door (`stage.run(cfg, recipe, paths)`) and call the
kind through it; nothing below the stages looks a recipe up by name.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

from coursepipe.config import ConfigError, Evaluate, Prepare, RecipeConfig, Train, Validate

Spec = tuple[str, dict[str, Any]]   # a Great Expectations rule: (expectation type, kwargs)


class ContractError(TypeError):
    """A recipe or kind does not fulfil the contract; the message names it and the field."""


@dataclass(frozen=True)
class Schema:
    """The prepared table a recipe's prepare writes, as the generic validation rules check it."""
    columns: tuple[str, ...]                      # exactly these columns (plus is_valid), in order
    target: str                                   # never missing
    categories: Mapping[str, tuple] = field(default_factory=dict)   # column -> allowed values
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # numeric, inclusive
    patterns: Mapping[str, str] = field(default_factory=dict)       # column -> regex every value matches
    classes: tuple[str, ...] = ()                 # a classifier's fixed classes; () = from the data

    def __post_init__(self):
        listed = {*self.categories, *self.ranges, *self.patterns, self.target}
        unknown = sorted(listed - set(self.columns))
        if unknown:
            raise ContractError(f"schema names columns {unknown} that are not in its columns")


@dataclass
class Evaluation:
    """Everything a kind's evaluate needs: the model as trained and the evaluate section."""
    name: str                     # the recipe's name, for titles
    recipe: "Recipe"
    model: Any                    # torch.nn.Module in eval mode, on CPU
    processor: dict               # fitted on the training rows (travels into the export)
    model_config: Any             # the model section the model was trained with (from the bundle)
    config: Evaluate              # this run's evaluate section (the kind's subclass)
    valid: Any                    # pandas DataFrame: the prepared table's validation rows
    plots: Path                   # plots/<recipe>/: every picture and table goes here


def even_steps(rows: int, bs: int, world: int) -> int:
    """Whole batches of bs / world rows in one rank's equal share of `rows` (global batch bs)."""
    return (rows // world) // max(1, bs // world)


class Kind(abc.ABC):
    """What every recipe of one kind of task shares. Subclasses set the class attributes and
    implement the abstract methods; the others have defaults that fit most kinds."""

    name: ClassVar[str]                         # on the model card
    portable: ClassVar[str]                     # module copied into the export as predict.py
    model_configs: ClassVar[tuple[type, ...]]   # model sections this kind can build from
    prepare_config: ClassVar[type] = Prepare    # the kind's prepare / validate / evaluate sections
    validate_config: ClassVar[type] = Validate
    evaluate_config: ClassVar[type] = Evaluate
    # ONNX exporters tried in order (coursepipe/stages/export.py): torch.export's, then the legacy
    # TorchScript one; a kind whose graph the first gets wrong names only the one that works
    exporters: ClassVar[tuple[str, ...]] = ("dynamo", "torchscript")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        members = sorted({n for n in (*dir(Kind), *Kind.__annotations__) if not n.startswith("_")})
        unknown = sorted(n for n in vars(cls) if not n.startswith("_") and n not in members)
        if unknown:
            raise ContractError(f"kind {cls.__name__} defines {unknown}, which Kind has no member "
                                f"of (misspelt?); Kind's members: {members}")

    # -- params
    def check(self, recipe: "Recipe", cfg: RecipeConfig) -> None:
        """Rules across a recipe's sections and its schema (a column the model needs, ...)."""

    # -- prepare
    def prepare(self, recipe: "Recipe", df, p: Prepare):
        """The read, normalised table -> the prepared one with `is_valid`: the recipe's fixed
        split when it has one, else a seeded random valid_pct of the rows."""
        import numpy as np

        from coursepipe.data.split import split_mask
        out = df.copy()
        fixed = recipe.split(out, p) if recipe.split is not None else None
        out["is_valid"] = (np.asarray(fixed, dtype=bool) if fixed is not None
                           else split_mask(len(out), p.valid_pct, p.seed))
        return out

    # -- validate
    def expectations(self, recipe: "Recipe", v: Validate) -> list[Spec]:
        """The kind's own rules, after the schema's generic ones (validation/suites.py)."""
        return []

    # -- train
    def prefetch(self, m) -> None:
        """Driver-side work before Ray starts (fetch and check pretrained weights)."""

    @abc.abstractmethod
    def fit_processor(self, recipe: "Recipe", train, m) -> dict:
        """Preprocessing state from the training rows only; JSON-able (it goes into the export)."""

    @abc.abstractmethod
    def tensors(self, recipe: "Recipe", processor: dict, df) -> tuple:
        """(inputs..., target) tensors for the rows of df."""

    @abc.abstractmethod
    def build_model(self, recipe: "Recipe", processor: dict, m):
        """The untrained torch model for model section m."""

    def plan(self, m, t: Train) -> list:
        """The training phases (learn/fine_tune.Phase): fastai's fit_one_cycle, or fine_tune
        when `train.freeze_epochs` > 0 (ULMFiT's classifier unfreezes gradually)."""
        from coursepipe.learn.fine_tune import phases
        return phases(t)

    def processor_from(self, recipe: "Recipe", train, m, upstream: dict) -> dict:
        """The processor of a run that starts from `upstream` (another recipe's bundle), in place
        of fit_processor: ULMFiT's classifier takes its language model's vocabulary instead of
        fitting one. Default: fit_processor's."""
        return self.fit_processor(recipe, train, m)

    def start_from(self, recipe: "Recipe", m, model, processor: dict, upstream: dict) -> None:
        """Load another recipe's trained model into `model` before training (params
        `recipes.<r>.starts_from: models/<other>`; ULMFiT's LM fine-tune and classifier).
        `upstream` is that recipe's bundle: its processor, state_dict and model_config."""
        raise ContractError(f"kind {self.name} cannot start from another recipe's model")

    def splitter(self, m, model) -> list[list]:
        """Param groups for freeze_to and discriminative learning rates (default: one group)."""
        return [list(model.parameters())]

    @abc.abstractmethod
    def loss_func(self, m) -> Callable:
        """loss(pred, y) -> a scalar tensor (mean over the batch)."""

    @abc.abstractmethod
    def metrics(self, m) -> dict[str, Callable]:
        """name -> f(pred, y) -> (sum, count) tensors, so ranks can add them up."""

    def batches(self, recipe: "Recipe", processor: dict, df, m, bs: int, rank: int, world: int,
                seed: int, train: bool):
        """callable(epoch) -> this rank's batches (default: in-memory tensors, sharded by rank)."""
        from coursepipe.data.batches import TensorBatches
        return TensorBatches(self.tensors(recipe, processor, df), bs, rank, world, seed, train=train)

    def callbacks(self, recipe: "Recipe", m, t: Train) -> list:
        """Extra training-loop callbacks (augmentation, pretrained weights, state resets)."""
        return []

    # -- the streaming data path (train.data_path: ray_data, coursepipe/distributed/ray_train.py)
    def heavy_columns(self, m) -> tuple[str, ...]:
        """Columns that only Ray Data's tasks read and decode (image bytes): the driver and the
        train workers hold the rest of the table. () = this kind has no streaming path."""
        return ()

    def processor_columns(self, m) -> tuple[str, ...]:
        """Heavy columns fit_processor needs for model section m (e.g. pixels for the data's own
        normalisation statistics); the driver reads them for the training rows only."""
        return ()

    def stream_rows(self, recipe: "Recipe", processor: dict, df) -> dict:
        """Ray Data's decode task: usable prepared rows, heavy columns included -> numpy columns
        t0 (first input) .. tN (target), one entry per row. Default: the kind's tensors(). A
        column may be ragged (an object array of per-row arrays) when stream_chunk(m) > 0."""
        return {f"t{i}": t.numpy() for i, t in enumerate(self.tensors(recipe, processor, df))}

    def stream_chunk(self, m) -> int:
        """0: Ray Data batches the decoded rows itself (fixed-size tensors). n > 0: each rank pulls
        n batches' worth of rows at a time and stream_batches makes its batches (text: rows of
        different lengths, padded per batch and grouped by length)."""
        return 0

    def stream_steps(self, processor: dict, m, rows: int, bs: int, world: int) -> int:
        """Steps of one rank's training pass over `rows` usable training rows (global batch bs),
        for the schedule. Default: its equal share of the rows in batches of bs / world."""
        return even_steps(rows, bs, world)

    def stream_batches(self, processor: dict, m, chunks, bs: int, rng):
        """A rank's pass when stream_chunk(m) > 0: the chunks of decoded rows it pulls (dicts of
        stream_rows' columns) -> its batches of bs rows, as tuples of tensors; rng: a generator
        seeded by (seed, epoch) when training, None when scoring. Ranks whose passes give
        different numbers of batches stop together, at the first step one of them has none."""
        raise ContractError(f"kind {self.name} streams fixed-size rows: stream_chunk is 0")

    def usable(self, df):
        """The rows that train and score (a policy may keep rows that are listed, not used)."""
        return df

    # -- evaluate
    @abc.abstractmethod
    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """(flat metrics, the main picture) for the validation rows; writes into run.plots."""

    # -- export
    def export_axes(self, names: list[str]) -> dict[str, dict[int, str]]:
        """{ONNX input: {axis: name}} of the dynamic axes (default: the batch axis)."""
        return {n: {0: "batch"} for n in names}

    def card(self, recipe: "Recipe", processor: dict) -> dict:
        """What the model card says about inputs and outputs (classes, target, columns)."""
        return {"target": recipe.schema.target}


def _no_rules(v: Validate) -> list[Spec]:
    return []


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """One course task. Required: where the data comes from and how it is laid out; the rest
    has explicit defaults (the kind's sections, no fixed split, no extra rules)."""
    name: str
    kind: Kind
    schema: Schema
    model_config: type                                  # the `model:` section's type
    synthesize: Callable[[int | None, int], bytes]      # (rows, seed) -> the offline sample archive
    read_raw: Callable[[Path, Prepare], Any]            # (extracted archive, prepare section) -> table
    normalise: Callable[[Any], Any]                     # raw table -> the schema's columns and types
    # fixed split (a valid folder or file) -> mask; None, or a split returning None: seeded random
    split: Callable[[Any, Prepare], Any] | None = None
    expectations: Callable[[Validate], list[Spec]] = _no_rules   # rules only this recipe has
    check: Callable[[RecipeConfig], None] | None = None  # rules across its sections (beyond the kind's)
    # the course's own result, for the run summary: (metric in metrics/<name>.json, value, what it was on)
    course: tuple[str, float, str] | None = None
    prepare_config: type | None = None                  # None: the kind's
    validate_config: type | None = None
    evaluate_config: type | None = None

    def __post_init__(self):
        if not isinstance(self.kind, Kind):
            raise ContractError(f"recipe {self.name}: kind must be a Kind, got {self.kind!r}")
        missing = [a for a in ("name", "portable", "model_configs") if not hasattr(self.kind, a)]
        if missing:
            raise ContractError(f"recipe {self.name}: kind {type(self.kind).__name__} does not set {missing}")
        if not isinstance(self.schema, Schema):
            raise ContractError(f"recipe {self.name}: schema must be a Schema, got {self.schema!r}")
        for fn in ("synthesize", "read_raw", "normalise", "expectations"):
            if not callable(getattr(self, fn)):
                raise ContractError(f"recipe {self.name}: {fn} must be callable")
        if self.model_config not in self.kind.model_configs:
            raise ContractError(f"recipe {self.name}: model_config {self.model_config.__name__} is "
                                f"not one of kind {self.kind.name}'s "
                                f"{[c.__name__ for c in self.kind.model_configs]}")
        for section in ("prepare", "validate", "evaluate"):
            own, base = getattr(self, f"{section}_config"), getattr(self.kind, f"{section}_config")
            if own is None:
                object.__setattr__(self, f"{section}_config", base)
            elif not (isinstance(own, type) and issubclass(own, base)):
                raise ContractError(f"recipe {self.name}: {section}_config must subclass "
                                    f"{base.__name__}, got {own!r}")

    @property
    def config_types(self) -> Mapping[str, type]:
        """The type of each section this recipe owns (the config loader types params.yaml by it)."""
        return {"model": self.model_config, "prepare": self.prepare_config,
                "validate": self.validate_config, "evaluate": self.evaluate_config}

    def check_config(self, cfg: RecipeConfig) -> None:
        """The kind's and the recipe's own cross-section rules; ConfigError names the key."""
        try:
            self.kind.check(self, cfg)
            if self.check is not None:
                self.check(cfg)
        except ConfigError as e:
            raise ConfigError(f"recipes.{self.name}.{e}") from None
