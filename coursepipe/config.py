"""params.yaml -> frozen, typed config. Unknown keys and wrong types are errors naming the key.

The file has one section per recipe under `recipes:`; each stage reads its own sub-section, so
DVC can lock exactly the numbers a stage depends on (`recipes.<name>.<stage>`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """params.yaml is malformed: the message names the key and what was expected."""


# ----------------------------------------------------------------------------- generic loader

def _join(where: str, key: Any) -> str:
    """The dotted key path of `key` inside `where` ('' is the top of the file)."""
    return f"{where}.{key}" if where else str(key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and convert lists to tuples, dicts to dataclasses."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} is not {_type_name(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        # a plain dict (not MappingProxyType): configs travel to Ray workers by pickle
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def build(cls: type, raw: dict, where: str) -> Any:
    """Build dataclass `cls` from `raw`, rejecting unknown keys and missing required ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - set(fields)))  # str: YAML keys may be numbers
    if unknown:
        keys = ", ".join(_join(where, k) for k in unknown)
        raise ConfigError(f"{keys}: unknown key; expected one of {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{name}'")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a __post_init__ rule: say where; a rule starting with a field name
        head, _, rest = str(e).partition(" ")  # ("epochs must be >= 1") names that field's path
        if head.rstrip(":") in fields and rest:
            raise ConfigError(f"{_join(where, head.rstrip(':'))}: {rest}") from None
        raise ConfigError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------- shared sections

@dataclass(frozen=True)
class Source:
    """Where one raw archive comes from. Exactly one of url / path / generate; a checksum for url/path."""
    url: str | None = None          # https:// (or file://) address of the archive
    path: str | None = None         # local archive, relative to the project root or absolute
    generate: str | None = None     # name of the recipe whose synthetic sample generator makes it
    sha256: str | None = None
    md5: str | None = None          # fastai's checks.txt uses md5
    rows: int | None = None         # synthetic sample size
    seed: int = 0                   # synthetic sample seed

    def __post_init__(self):
        from coursepipe.recipes import RECIPES

        given = [k for k in ("url", "path", "generate") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"a source needs exactly one of url / path / generate, got {given or 'none'}")
        if not self.generate and not (self.sha256 or self.md5):
            raise ConfigError(f"source {given[0]}={getattr(self, given[0])!r} needs a sha256 or md5 checksum")
        for algo, digits in (("sha256", 64), ("md5", 32)):  # a typo here would fail every fetch
            value = getattr(self, algo)
            if value and not (len(value) == digits and all(c in "0123456789abcdefABCDEF" for c in value)):
                raise ConfigError(f"{algo} must be {digits} hex digits, got {value!r}")
        if self.url and self.url.split("://")[0].lower() not in ("https", "http", "file"):
            raise ConfigError(f"url must be https://, http:// or file://, got {self.url!r}")
        if self.generate and self.generate not in RECIPES:
            raise ConfigError(f"generate names no recipe: {self.generate!r}; known: {sorted(RECIPES)}")
        if self.rows is not None and self.rows < 1:
            raise ConfigError(f"rows must be >= 1, got {self.rows}")


@dataclass(frozen=True)
class Prepare:
    valid_pct: float = 0.2          # fraction of rows held out, seeded random split
    seed: int = 42

    def __post_init__(self):
        if not 0.0 < self.valid_pct < 1.0:
            raise ConfigError(f"valid_pct must be in (0, 1), got {self.valid_pct}")


@dataclass(frozen=True)
class Validate:
    """Run-time reporting, and the thresholds `coursepipe gx-init` bakes into the committed suite."""
    result_format: Literal["SUMMARY", "COMPLETE"] = "SUMMARY"
    examples: int = 5               # bad values quoted per failed rule in the error message
    min_rows: int = 1000            # fewer rows than this is a broken extract, not a dataset
    max_null: float = 0.0           # tolerated fraction of missing values in a column not listed below
    max_null_by_column: dict[str, float] = field(default_factory=dict)  # per-column overrides
    unknown_category: float = 0.0   # tolerated fraction of non-missing values outside a column's vocabulary
    min_per_class: int = 1          # image recipes: fewest images of any class in each split
    image_side: tuple[int, int] = (1, 100_000)  # image recipes: allowed width/height, pixels

    def __post_init__(self):
        if self.examples < 0:
            raise ConfigError(f"examples must be >= 0, got {self.examples}")
        if self.min_rows < 1:
            raise ConfigError(f"min_rows must be >= 1, got {self.min_rows}")
        fractions = {"max_null": self.max_null, "unknown_category": self.unknown_category,
                     **{f"max_null_by_column.{k}": v for k, v in self.max_null_by_column.items()}}
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a fraction in [0, 1], got {value}")


@dataclass(frozen=True)
class Train:
    epochs: int = 1
    bs: int = 64                    # global batch size, split across workers
    lr: float = 1e-2                # peak of the one-cycle schedule
    wd: float = 1e-2                # AdamW decoupled weight decay
    pct_start: float = 0.25         # fraction of steps spent warming up
    moms: tuple[float, float, float] = (0.95, 0.85, 0.95)  # beta1 at start, peak lr, end
    div: float = 25.0               # start lr = lr / div
    div_final: float = 1e5          # final lr = lr / div_final
    freeze_epochs: int = 0          # > 0: fastai's fine_tune: this many frozen epochs first, then
    lr_mult: float = 100.0          #   `epochs` unfrozen at slice(lr / 2 / lr_mult, lr / 2)
    seed: int = 42
    num_workers: int = 2            # Ray Train workers (data-parallel ranks)
    cpus_per_worker: int = 1
    threads: int = 0                # torch intra-op threads per worker; 0 = cpus_per_worker
    use_gpu: bool = False
    mixed_precision: bool = True    # bf16/fp16 autocast, only where the device is a GPU
    max_failures: int = 2           # worker-group restarts Ray Train may make (FailureConfig)

    def __post_init__(self):
        for name in ("epochs", "bs", "num_workers", "cpus_per_worker"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.pct_start < 1.0:
            raise ConfigError(f"pct_start must be in [0, 1), got {self.pct_start}")
        if self.freeze_epochs < 0:
            raise ConfigError(f"freeze_epochs must be >= 0, got {self.freeze_epochs}")
        if self.lr_mult < 1:
            raise ConfigError(f"lr_mult must be >= 1, got {self.lr_mult}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class Export:
    opset: int = 18
    parity_atol: float = 1e-4       # max |onnx - torch| probability difference on valid rows
    parity_rows: int = 2048


@dataclass(frozen=True)
class Schedule:
    cron: str = "0 2 * * *"         # nightly retraining deployment
    timezone: str = "UTC"


@dataclass(frozen=True)
class RecipeConfig:
    name: str
    source: str                                   # key into `sources`
    sources: dict[str, Source]
    model: Any                                    # the recipe's own frozen ModelConfig
    prepare: Prepare = field(default_factory=Prepare)
    validate: Validate = field(default_factory=Validate)
    train: Train = field(default_factory=Train)
    export: Export = field(default_factory=Export)
    schedule: Schedule = field(default_factory=Schedule)

    @property
    def source_file(self) -> str:
        """The archive under data/: data/<recipe>/<source>.<tgz|zip>, one file per source.

        A folder per recipe lets dvc.yaml depend on `data/<recipe>` whatever the archive type."""
        src = self.active_source
        origin = (src.url or src.path or "").lower()
        return f"{self.name}/{self.source}{'.zip' if origin.endswith('.zip') else '.tgz'}"

    @property
    def active_source(self) -> Source:
        return self.sources[self.source]


@dataclass(frozen=True)
class Params:
    recipes: dict[str, RecipeConfig]
    ray_storage: str = ".runs"        # Ray Train run folder; absolute, URI, or relative to the root

    def recipe(self, name: str) -> RecipeConfig:
        if name not in self.recipes:
            raise ConfigError(f"unknown recipe {name!r}; params.yaml has {sorted(self.recipes)}")
        return self.recipes[name]


# ----------------------------------------------------------------------------- entry points

def parse_recipe(name: str, raw: Any) -> RecipeConfig:
    from coursepipe.recipes import get_recipe  # the recipe module declares its ModelConfig

    where = f"recipes.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    try:
        recipe = get_recipe(name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if "name" in raw:  # filled in from the section's key below; a second spelling would be ignored
        raise ConfigError(f"{where}.name: unknown key; a recipe's name is its key under `recipes:`")
    raw = dict(raw)
    model = _coerce(raw.pop("model", {}), recipe.ModelConfig, f"{where}.model")
    cfg = build(RecipeConfig, {**raw, "name": name, "model": {}}, where)
    cfg = dataclasses.replace(cfg, model=model)
    if cfg.source not in cfg.sources:
        raise ConfigError(f"{where}.source: {cfg.source!r} is not one of the sources {sorted(cfg.sources)}")
    return cfg


def parse(raw: Any) -> Params:
    if not isinstance(raw, dict) or not isinstance(raw.get("recipes"), dict):
        raise ConfigError("params.yaml: expected a mapping with a 'recipes:' section")
    raw = dict(raw)
    recipes = {name: parse_recipe(name, r) for name, r in raw.pop("recipes").items()}
    params = build(Params, {**raw, "recipes": {}}, "")
    return dataclasses.replace(params, recipes=recipes)


def load(path: str | Path = "params.yaml") -> Params:
    """Read and check params.yaml; YAML syntax errors become ConfigError naming the file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except yaml.YAMLError as e:  # one line: the CLI prints it as the whole error
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = problem or " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML{at}: {detail}") from None
    try:
        return parse(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
