"""params.yaml -> frozen, typed config. Unknown keys, missing keys and wrong types are errors
naming the dotted key.

Layout of the file:

    ray_storage: .runs                 # where Ray Train keeps checkpoints (runtime, not a result)
    fetch_timeout_s: 60.0              # `coursepipe fetch` downloads (runtime)
    serve: {host, port, limits..., ray: {replicas, ...}}   # `coursepipe serve` (config.Serve)
    defaults:                          # shared values, written once
      prepare: {...}  validate: {...}  train: {...}  evaluate: {...}  export: {...}  schedule: {...}
    recipes:
      adult:
        source: synthetic
        sources: {synthetic: {generate: adult, ...}, uci: {path: ..., sha256: ...}}
        prepare: {...}  validate: {...}  model: {...}  train: {...}  evaluate: {...}
        export: {...}  schedule: {...}

Every recipe lists every section (`{}` when the defaults are all it needs), because DVC locks
`recipes.<r>.<section>` and fails on a section that is not in the file. A section's values are
`defaults.<section>` overlaid key by key with the recipe's own; nothing has a default in code,
so params.yaml is the only place a number lives. Each section is typed by the recipe and its kind
(`coursepipe/contract.py`): `model:` by the recipe's model config, `prepare:` / `validate:` /
`evaluate:` by the kind's (or the recipe's) subclass of the base sections below.

Every built section knows the params.yaml key of each of its fields (`defaults.train.lr` or
`recipes.adult.train.lr`, whichever the value came from), so `recording()` can list the keys a
stage reads: the param audit checks them against the stage's params in dvc.yaml.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import yaml


class ConfigError(ValueError):
    """params.yaml is malformed: the message names the key and what was expected."""


# ----------------------------------------------------------------------------- read recording

_RECORDER: set[str] | None = None


@contextmanager
def recording() -> Iterator[set[str]]:
    """Collect the params.yaml keys of every config field read inside the block."""
    global _RECORDER
    outer, _RECORDER = _RECORDER, set()
    try:
        yield _RECORDER
    finally:
        _RECORDER = outer


def _holds_sections(value: Any) -> bool:
    """A nested section (or a dict of them) is a path to values, not a value read."""
    if isinstance(value, Section):
        return True
    return isinstance(value, dict) and bool(value) and all(isinstance(v, Section) for v in value.values())


class Section:
    """Base of every config dataclass: records reads of its fields while `recording()` is on.

    `_keys` maps a field to its params.yaml key; {} marks a section that is not from params.yaml
    (a trained model's stored config), None one built by hand, whose reads show as `?Class.field`
    so an audit cannot mistake them for declared params."""
    _keys: dict[str, str] | None = None

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if _RECORDER is not None and not name.startswith("_") \
                and name in type(self).__dataclass_fields__ and not _holds_sections(value):
            keys = object.__getattribute__(self, "_keys")
            if keys is None:
                _RECORDER.add(f"?{type(self).__name__}.{name}")
            elif name in keys:
                _RECORDER.add(keys[name])
        return value


def evolve(section: Section, **changes) -> Any:
    """dataclasses.replace that keeps the params keys (tests and the CLI's --source use it)."""
    out = dataclasses.replace(section, **changes)
    object.__setattr__(out, "_keys", object.__getattribute__(section, "_keys"))
    return out


# ----------------------------------------------------------------------------- generic loader

def _join(where: str, key: Any) -> str:
    """The dotted key path of `key` inside `where` ('' is the top of the file)."""
    return f"{where}.{key}" if where else str(key)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, located: bool) -> Any:
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
                return _coerce(value, arm, where, located)
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
        return build(tp, value, where, located=located)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", located) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]", located) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        # a plain dict (not MappingProxyType): configs travel to Ray workers by pickle
        return {_coerce(k, kt, where, located): _coerce(v, vt, f"{where}.{k}", located)
                for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan / .inf parse as floats and pass every `<` check
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
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


def _admits_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def build(cls: type, raw: dict, where: str, origin: Mapping[str, str] | None = None,
          located: bool = True) -> Any:
    """Build dataclass `cls` from `raw`, rejecting unknown keys and missing ones: only a field
    whose type admits None may be left out (it takes its dataclass default, None).

    `origin` names the key of fields whose value came from elsewhere (defaults.<section>);
    `located=False` builds a section that is not from params.yaml (its reads are not params)."""
    origin = origin or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(raw) - set(fields)))  # str: YAML keys may be numbers
    if unknown:
        keys = ", ".join(origin.get(k) or _join(where, k) for k in unknown)
        raise ConfigError(f"{keys}: unknown key; expected one of {sorted(fields)}")
    kwargs, keys = {}, {}
    for name, f in fields.items():
        key = keys[name] = origin.get(name) or _join(where, name)  # left out is a value too
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], key, located)
        elif not _admits_none(hints[name]):  # a code default never stands in for a params value
            raise ConfigError(f"{where + ': ' if where else ''}missing required key '{name}'")
    global _RECORDER
    outer, _RECORDER = _RECORDER, None  # __post_init__'s checks are the loader's reads, not a stage's
    try:
        obj = cls(**kwargs)
    except ConfigError as e:  # a __post_init__ rule: say where; a rule starting with a field name
        head, _, rest = str(e).partition(" ")  # ("epochs must be >= 1") names that field's key
        field_name = head.rstrip(":")
        if field_name in fields and rest:
            raise ConfigError(f"{origin.get(field_name) or _join(where, field_name)}: {rest}") from None
        raise ConfigError(f"{where}: {e}") from None
    finally:
        _RECORDER = outer
    if isinstance(obj, Section):
        object.__setattr__(obj, "_keys", keys if located else {})
    return obj


def positive(obj, *names: str) -> None:
    """The named fields must be >= 1 (counts, sizes)."""
    for name in names:
        if getattr(obj, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(obj, name)}")


def one_of(obj, **allowed: tuple) -> None:
    """Each named field must hold one of its allowed values."""
    for name, values in allowed.items():
        if getattr(obj, name) not in values:
            raise ConfigError(f"{name}: {getattr(obj, name)!r} is not one of {list(values)}")


# ----------------------------------------------------------------------------- shared sections

@dataclass(frozen=True)
class Source(Section):
    """Where one raw archive comes from. Exactly one of url / path / generate; a checksum for url/path."""
    url: str | None = None          # https:// (or file://) address of the archive
    path: str | None = None         # local archive, relative to the project root or absolute
    generate: str | None = None     # name of the recipe whose synthetic sample generator makes it
    sha256: str | None = None
    md5: str | None = None          # fastai's checks.txt uses md5
    rows: int | None = None         # synthetic sample size (None: the generator's own)
    seed: int | None = None         # synthetic sample seed

    def __post_init__(self):
        given = [k for k in ("url", "path", "generate") if getattr(self, k)]
        if len(given) != 1:
            raise ConfigError(f"a source needs exactly one of url / path / generate, got {given or 'none'}")
        if not self.generate and not (self.sha256 or self.md5):
            raise ConfigError(f"source {given[0]}={getattr(self, given[0])!r} needs a sha256 or md5 checksum")
        if self.generate and self.seed is None:
            raise ConfigError("a generated source needs a seed (the sample must be byte-reproducible)")
        for algo, digits in (("sha256", 64), ("md5", 32)):  # a typo here would fail every fetch
            value = getattr(self, algo)
            if value and not (len(value) == digits and all(c in "0123456789abcdefABCDEF" for c in value)):
                raise ConfigError(f"{algo} must be {digits} hex digits, got {value!r}")
        if self.url and self.url.split("://")[0].lower() not in ("https", "http", "file"):
            raise ConfigError(f"url must be https://, http:// or file://, got {self.url!r}")
        if self.rows is not None and self.rows < 1:
            raise ConfigError(f"rows must be >= 1, got {self.rows}")


@dataclass(frozen=True)
class Prepare(Section):
    """prepare: how the raw table becomes the prepared one. Kinds extend it with their policies."""
    valid_pct: float                # fraction of rows held out by the seeded random split
    seed: int

    def __post_init__(self):
        if not 0.0 < self.valid_pct < 1.0:
            raise ConfigError(f"valid_pct must be in (0, 1), got {self.valid_pct}")


@dataclass(frozen=True)
class Validate(Section):
    """Run-time reporting, and the thresholds `coursepipe gx-init` bakes into the committed suite."""
    result_format: Literal["SUMMARY", "COMPLETE"]
    examples: int                   # bad values quoted per failed rule in the error message
    min_rows: int                   # fewer rows than this is a broken extract, not a dataset
    max_null: float                 # tolerated fraction of missing values in a column not listed below
    max_null_by_column: dict[str, float]  # per-column overrides
    unknown_category: float         # tolerated fraction of non-missing values outside a column's vocabulary

    def __post_init__(self):
        if self.examples < 0:
            raise ConfigError(f"examples must be >= 0, got {self.examples}")
        positive(self, "min_rows")
        fractions = {"max_null": self.max_null, "unknown_category": self.unknown_category,
                     **{f"max_null_by_column.{k}": v for k, v in self.max_null_by_column.items()}}
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a fraction in [0, 1], got {value}")


@dataclass(frozen=True)
class Train(Section):
    epochs: int
    bs: int                         # global batch size, split across workers
    valid_bs: int                   # batch size of the per-epoch validation (no gradients held)
    lr: float                       # peak of the one-cycle schedule
    wd: float                       # AdamW decoupled weight decay
    pct_start: float                # fraction of steps spent warming up
    moms: tuple[float, float, float]  # beta1 at start, peak lr, end
    sqr_mom: float                  # AdamW beta2 (fastai's 0.99)
    eps: float                      # AdamW eps (fastai's 1e-5)
    div: float                      # start lr = lr / div
    div_final: float                # final lr = lr / div_final
    freeze_epochs: int              # > 0: fastai's fine_tune: this many frozen epochs first, then
    lr_mult: float                  #   `epochs` unfrozen at slice(unfrozen_lr / lr_mult, unfrozen_lr)
    unfrozen_lr: float | None       # fine_tune's unfrozen peak; None: lr / 2 (fastai's fine_tune)
    # BatchNorm of the body (every param group but the head): `train` (fastai's default: always
    # trainable, batch statistics), `freeze_frozen` (frozen groups' BN frozen too and its running
    # statistics kept: fastai's train_bn=False + BnFreeze), `fixed_stats` (the body's BN keeps its
    # pretrained running statistics in every phase: batches too small to estimate them)
    bn: Literal["train", "freeze_frozen", "fixed_stats"]
    seed: int
    num_workers: int                # Ray Train workers (data-parallel ranks)
    cpus_per_worker: int
    threads: int                    # torch intra-op threads per worker; 0 = cpus_per_worker
    use_gpu: bool
    mixed_precision: bool           # bf16 autocast, only where the device is a GPU
    channels_last: bool             # NHWC memory format for the model and 4-D inputs (GPU convolutions)
    max_failures: int               # worker-group restarts Ray Train may make (FailureConfig)
    # memory: the prepared table travels to every worker in the train config; ray_data: workers
    # stream their shard of it from Ray Data, bytes decoded in Ray Data tasks (kinds that have it)
    data_path: Literal["memory", "ray_data"]
    shuffle_buffer: int             # ray_data: rows in each rank's local shuffle buffer
    decode_cpus: float              # ray_data: CPUs each read / decode task reserves (fractions share)
    valid_cache_mb: int             # ray_data: MB of decoded validation batches rank 0 keeps to score later epochs
    checkpoints_kept: int           # newest Ray checkpoints kept per run (older ones deleted)

    def __post_init__(self):
        positive(self, "epochs", "bs", "valid_bs", "num_workers", "cpus_per_worker", "checkpoints_kept")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.wd < 0:
            raise ConfigError(f"wd must be >= 0, got {self.wd}")
        if not 0.0 <= self.pct_start < 1.0:
            raise ConfigError(f"pct_start must be in [0, 1), got {self.pct_start}")
        if not all(0.0 <= m < 1.0 for m in (*self.moms, self.sqr_mom)):
            raise ConfigError(f"moms and sqr_mom must be in [0, 1), got {list(self.moms)}, {self.sqr_mom}")
        if self.eps <= 0 or self.div < 1 or self.div_final < 1:
            raise ConfigError(f"eps must be > 0 and div, div_final >= 1, got {self.eps}, {self.div}, "
                              f"{self.div_final}")
        if self.freeze_epochs < 0:
            raise ConfigError(f"freeze_epochs must be >= 0, got {self.freeze_epochs}")
        if self.lr_mult < 1:
            raise ConfigError(f"lr_mult must be >= 1, got {self.lr_mult}")
        if self.unfrozen_lr is not None and self.unfrozen_lr <= 0:
            raise ConfigError(f"unfrozen_lr must be > 0 or null, got {self.unfrozen_lr}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")
        positive(self, "shuffle_buffer")
        if self.valid_cache_mb < 0:
            raise ConfigError(f"valid_cache_mb must be >= 0, got {self.valid_cache_mb}")
        if not 0.0 <= self.decode_cpus:
            raise ConfigError(f"decode_cpus must be >= 0, got {self.decode_cpus}")
        if self.max_failures < 0:
            raise ConfigError(f"max_failures must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class Evaluate(Section):
    """evaluate: how the trained model is scored and pictured. Kinds extend it (plots)."""
    bs: int                         # inference batch size

    def __post_init__(self):
        positive(self, "bs")


@dataclass(frozen=True)
class Export(Section):
    opset: int
    parity_atol: float              # max |onnx - torch| output difference on valid rows
    parity_rows: int                # valid rows compared (and exported in one batch)

    def __post_init__(self):
        positive(self, "opset", "parity_rows")


@dataclass(frozen=True)
class Schedule(Section):
    cron: str                       # the recipe's retraining deployment
    timezone: str


@dataclass(frozen=True)
class RayServe(Section):
    """serve.ray: the same app as a Ray Serve deployment (`coursepipe serve --ray`)."""
    replicas: int                   # fixed replica count when autoscale is false
    cpus_per_replica: float         # Ray resources each replica reserves
    autoscale: bool                 # true: Serve scales between min_replicas and max_replicas
    min_replicas: int
    max_replicas: int
    target_ongoing_requests: float  # autoscale: requests in flight per replica Serve aims for

    def __post_init__(self):
        positive(self, "replicas", "min_replicas", "max_replicas")
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"min_replicas must be <= max_replicas ({self.max_replicas}), got {self.min_replicas}")
        for name in ("cpus_per_replica", "target_ongoing_requests"):
            if not getattr(self, name) > 0:  # `not >` also refuses NaN
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Serve(Section):
    """serve: `coursepipe serve`, the web app and JSON API over export/<recipe>/ folders."""
    host: str
    port: int
    export_root: str                # folder of export/<recipe>/ folders, relative to the root
    max_upload_bytes: int           # a request body above this is refused (413) while it streams in
    max_pixels: int                 # width x height above this is refused before decoding (bombs)
    max_text_chars: int             # longest text field (a review, a prompt, a table cell)
    max_batch: int                  # inputs per API call
    max_new_tokens: int             # language models: longest continuation asked for
    top_k: int                      # classes listed per prediction
    recommend_n: int                # collaborative filtering: the page's top-N
    ray: RayServe

    def __post_init__(self):
        positive(self, "port", "max_upload_bytes", "max_pixels", "max_text_chars", "max_batch",
                 "max_new_tokens", "top_k", "recommend_n")


# the sections every recipe has, with their base types; `defaults:` may set any of their fields
SECTIONS: dict[str, type] = {"prepare": Prepare, "validate": Validate, "train": Train,
                             "evaluate": Evaluate, "export": Export, "schedule": Schedule}


@dataclass(frozen=True)
class RecipeConfig(Section):
    name: str                       # the recipe's key under `recipes:` (not a param itself)
    source: str                     # key into `sources`
    sources: dict[str, Source]
    prepare: Prepare                # each typed by the recipe (a subclass of the base section)
    validate: Validate
    model: Any
    train: Train
    evaluate: Evaluate
    export: Export
    schedule: Schedule
    # what train starts from, as a path DVC can depend on: `prepared/<name>` (its own data only)
    # or `models/<other recipe>` (that recipe's trained model: ULMFiT's LM fine-tune, classifier)
    starts_from: str

    @property
    def upstream(self) -> str | None:
        """The recipe whose trained model this one starts from, or None."""
        return self.starts_from.split("/", 1)[1] if self.starts_from.startswith("models/") else None

    @property
    def source_file(self) -> str:
        """The archive under data/: data/<recipe>/<source>.<tgz|zip>, one file per source.

        A folder per recipe lets dvc.yaml depend on `data/<recipe>` whatever the archive type."""
        src = self.active_source
        where = (src.url or src.path or "").lower()
        return f"{self.name}/{self.source}{'.zip' if where.endswith('.zip') else '.tgz'}"

    @property
    def active_source(self) -> Source:
        return self.sources[self.source]


@dataclass(frozen=True)
class Params(Section):
    recipes: dict[str, RecipeConfig]
    ray_storage: str                # Ray Train run folder; absolute, URI, or relative to the root
    fetch_timeout_s: float          # seconds a download may stall before `fetch` gives up
    defaults: dict[str, Any]        # merged into the recipes' sections; kept for reference
    serve: Serve                    # `coursepipe serve` (reads no recipe section)

    def recipe(self, name: str) -> RecipeConfig:
        if name not in self.recipes:
            raise ConfigError(f"unknown recipe {name!r}; params.yaml has {sorted(self.recipes)}")
        return self.recipes[name]


class RecipeTypes(typing.Protocol):
    """What the loader needs of a recipe: the type of each section it owns (contract.Recipe)."""
    @property
    def config_types(self) -> Mapping[str, type]: ...


# ----------------------------------------------------------------------------- entry points

def check_defaults(raw: Any) -> dict[str, dict]:
    """`defaults:` may only set fields of the base sections (a kind's own keys go in each recipe)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"defaults: expected a mapping, got {raw!r}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"defaults.{section}: unknown section; expected one of {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"defaults.{section}: expected a mapping, got {values!r}")
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        unknown = sorted(map(str, set(values) - fields))
        if unknown:
            raise ConfigError(f"defaults.{section}.{unknown[0]}: unknown key; expected one of {sorted(fields)}")
    return raw


def merged(section: str, raw: dict, defaults: dict[str, dict], where: str) -> tuple[dict, dict]:
    """(values, origin): defaults.<section> overlaid with the recipe's keys; origin names the
    defaults key of every value the recipe does not set itself."""
    own = raw.get(section)
    if own is None:
        raise ConfigError(f"{where}: missing required key '{section}' (write `{section}: {{}}` to "
                          f"take every value from defaults.{section}; DVC needs the section)")
    if not isinstance(own, dict):
        raise ConfigError(f"{where}.{section}: expected a mapping, got {own!r}")
    shared = defaults.get(section, {})
    origin = {k: f"defaults.{section}.{k}" for k in shared if k not in own}
    return {**shared, **own}, origin


def parse_recipe(name: str, raw: Any, types_of: Mapping[str, type], defaults: dict[str, dict]) -> RecipeConfig:
    where = f"recipes.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    if "name" in raw:  # filled in from the section's key below; a second spelling would be ignored
        raise ConfigError(f"{where}.name: unknown key; a recipe's name is its key under `recipes:`")
    allowed = {"source", "sources", "model", "starts_from", *SECTIONS}
    unknown = sorted(map(str, set(raw) - allowed))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected one of {sorted(allowed)}")
    for key in ("source", "sources", "model", "starts_from"):
        if key not in raw:
            raise ConfigError(f"{where}: missing required key '{key}'")
    own = f"prepared/{name}"
    starts = raw["starts_from"]
    if not isinstance(starts, str) or not (starts == own or (
            starts.startswith("models/") and starts.count("/") == 1 and starts != f"models/{name}")):
        raise ConfigError(f"{where}.starts_from: expected {own!r} (its own data) or "
                          f"'models/<another recipe>' (that recipe's trained model), got {starts!r}")
    if not isinstance(raw["source"], str):
        raise ConfigError(f"{where}.source: expected str, got {raw['source']!r}")
    sources = _coerce(raw["sources"], dict[str, Source], f"{where}.sources", True)
    if raw["source"] not in sources:
        raise ConfigError(f"{where}.source: {raw['source']!r} is not one of the sources {sorted(sources)}")
    sections = {}
    for section, base in SECTIONS.items():
        values, origin = merged(section, raw, defaults, where)
        tp = types_of.get(section, base)
        sections[section] = build(tp, values, f"{where}.{section}", origin)
    model = _coerce(raw["model"], types_of["model"], f"{where}.model", True)
    cfg = RecipeConfig(name=name, source=raw["source"], sources=sources, model=model,
                       starts_from=starts, **sections)
    # every field but `name` is a param; the nested sections record their own reads
    object.__setattr__(cfg, "_keys", {k: f"{where}.{k}" for k in
                                      ("source", "sources", "model", "starts_from", *SECTIONS)})
    return cfg


def parse(raw: Any, recipes: Mapping[str, RecipeTypes]) -> Params:
    """Check and type a whole params file; `recipes` maps each recipe name to its contract."""
    if not isinstance(raw, dict) or not isinstance(raw.get("recipes"), dict):
        raise ConfigError("params.yaml: expected a mapping with a 'recipes:' section")
    raw = dict(raw)
    defaults = check_defaults(raw.get("defaults"))
    parsed = {}
    for name, section in raw.pop("recipes").items():
        if name not in recipes:
            raise ConfigError(f"recipes.{name}: no such recipe (expected a module "
                              f"coursepipe/recipes/{name}.py declaring RECIPE)")
        parsed[name] = parse_recipe(name, section, recipes[name].config_types, defaults)
        for src_name, src in parsed[name].sources.items():
            if src.generate and src.generate not in recipes:
                raise ConfigError(f"recipes.{name}.sources.{src_name}.generate: {src.generate!r} "
                                  f"names no recipe")
    for name, cfg in parsed.items():
        if cfg.upstream is not None and cfg.upstream not in parsed:
            raise ConfigError(f"recipes.{name}.starts_from: {cfg.starts_from!r} names no recipe "
                              f"of this file ({sorted(parsed)})")
    params = build(Params, {**raw, "recipes": {}, "defaults": {}}, "")
    params = dataclasses.replace(params, recipes=parsed, defaults=defaults)
    object.__setattr__(params, "_keys", {"ray_storage": "ray_storage", "fetch_timeout_s": "fetch_timeout_s",
                                         "serve": "serve"})
    return params


def load(path: str | Path, recipes: Mapping[str, RecipeTypes]) -> Params:
    """Read and check params.yaml; YAML syntax errors become ConfigError naming the file."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        return parse(raw, recipes)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_serve(path: str | Path) -> Serve:
    """params.yaml's `serve:` section alone: the server needs no recipe (nor their code, torch)."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict) or "serve" not in raw:
        raise ConfigError(f"{path}: missing required key 'serve'")
    try:
        return _coerce(raw["serve"], Serve, "serve", True)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_yaml(path: Path) -> Any:
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found") from None
    except yaml.YAMLError as e:  # one line: the CLI prints it as the whole error
        mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        detail = problem or " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML{at}: {detail}") from None
    return raw
