"""A recipe's expectation suite, generated from its schema and params, and the GX objects that run it.

`coursepipe gx-init <recipe>` (`init_suite`) writes gx/expectations/<recipe>.json once; it is
committed, and the validate stage loads that file, so a hand-edited suite is what runs. The
thresholds in params.yaml (`recipes.<name>.validate`) therefore take effect at gx-init time.
Great Expectations is imported inside functions: its import alone takes ~5 s.
"""
from __future__ import annotations

import json
from pathlib import Path

from coursepipe.config import ConfigError, RecipeConfig, Validate
from coursepipe.contract import Recipe, Spec
from coursepipe.paths import Paths

SPLIT = "is_valid"          # bool column the prepare stage adds: True for validation rows
NUMERIC_TYPES = ("float64", "float32", "int64", "int32", "Float64", "Int64")
DATASOURCE = "pandas"       # one in-memory pandas datasource; each recipe is an asset of it
BATCH = "whole"             # the whole prepared table is one batch



# ----------------------------------------------------------------------------- the rules (pure)

def _mostly(tolerance: float) -> dict[str, float]:
    """GX's `mostly` for a tolerated bad fraction; omitted when nothing is tolerated."""
    return {"mostly": round(1.0 - tolerance, 6)} if tolerance > 0 else {}


def null_tolerance(v: Validate, column: str) -> float:
    return v.max_null_by_column.get(column, v.max_null)


def expectation_specs(recipe: Recipe, v: Validate) -> list[Spec]:
    """Every rule for a prepared table: the schema's generic ones (columns, row count, then each
    column in order: nulls, type and range, vocabulary, pattern, classes), the kind's, the recipe's."""
    schema = recipe.schema
    columns = list(schema.columns) + [SPLIT]
    unknown = sorted(set(v.max_null_by_column) - set(schema.columns))
    if unknown:
        raise ConfigError(f"validate.max_null_by_column: {unknown} are not columns of {recipe.name}'s "
                          f"prepared table {list(schema.columns)}")
    if schema.target in v.max_null_by_column:
        raise ConfigError(f"validate.max_null_by_column: the target {schema.target!r} may not be missing")
    specs: list[Spec] = [
        ("expect_table_columns_to_match_set", {"column_set": columns, "exact_match": True}),
        ("expect_table_row_count_to_be_between", {"min_value": v.min_rows}),
    ]
    for col in columns:
        # the target and the split are never missing, whatever the default tolerance says
        tol = 0.0 if col in (schema.target, SPLIT) else null_tolerance(v, col)
        specs.append(("expect_column_values_to_not_be_null", {"column": col, **_mostly(tol)}))
        if col in schema.ranges:
            lo, hi = schema.ranges[col]
            specs.append(("expect_column_values_to_be_in_type_list",
                          {"column": col, "type_list": list(NUMERIC_TYPES)}))
            specs.append(("expect_column_values_to_be_between",
                          {"column": col, "min_value": lo, "max_value": hi}))
        if col in schema.categories:
            specs.append(("expect_column_values_to_be_in_set",
                          {"column": col, "value_set": list(schema.categories[col]),
                           **_mostly(v.unknown_category)}))
        if col in schema.patterns:
            specs.append(("expect_column_values_to_match_regex",
                          {"column": col, "regex": schema.patterns[col]}))
        if col == schema.target and schema.classes:  # classifiers with fixed classes
            specs.append(("expect_column_values_to_be_in_set",
                          {"column": col, "value_set": list(schema.classes)}))
            # a class that never occurs cannot be learned
            specs.append(("expect_column_distinct_values_to_contain_set",
                          {"column": col, "value_set": list(schema.classes)}))
        if col == SPLIT:  # training needs rows on both sides of the split
            specs.append(("expect_column_distinct_values_to_contain_set",
                          {"column": col, "value_set": [False, True]}))
    return unique(specs + recipe.kind.expectations(recipe, v) + list(recipe.expectations(v)))


def unique(specs: list[Spec]) -> list[Spec]:
    """The rules in order, each once. A kind or recipe may repeat a generic rule; with every copy
    kept, gx-init wrote them all and its rerun failed in GX 1.24.1 ("Expectation IDs must be
    unique within a suite": save_suite gives equal rules the one id they had)."""
    first: dict[str, Spec] = {}
    for t, kwargs in specs:
        first.setdefault(rule_key(t, kwargs), (t, kwargs))
    return list(first.values())


def rule_key(type_: str, kwargs: dict, meta: dict | None = None) -> str:
    """What makes two rules the same: type, kwargs and meta (not GX's random id)."""
    return json.dumps({"type": type_, "kwargs": kwargs, "meta": meta or {}}, sort_keys=True, default=str)


def spec_key(expectation) -> str:
    """rule_key of a GX expectation."""
    conf = expectation.configuration
    return rule_key(conf.type, conf.kwargs, conf.meta)


# ----------------------------------------------------------------------------- GX objects

def build_suite(cfg: RecipeConfig, recipe: Recipe):
    """The recipe's suite as a GX ExpectationSuite (not saved)."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

    specs = expectation_specs(recipe, cfg.validate)
    expectations = [ExpectationConfiguration(type=t, kwargs=kw).to_domain_obj() for t, kw in specs]
    meta = {"generated_by": f"coursepipe gx-init {cfg.name}",
            "from": f"coursepipe/recipes/{cfg.name}.py schema, kind {recipe.kind.name} + "
                    f"params.yaml recipes.{cfg.name}.validate"}
    return gx.ExpectationSuite(name=cfg.name, expectations=expectations, meta=meta)


def open_context(root: Path):
    """The file context under <root>/gx, with progress bars off (they go to stderr, 8-24 lines a run)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="file", project_root_dir=str(root))
    # in memory only: a run must not rewrite the committed great_expectations.yml
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def save_suite(ctx, suite):
    """add_or_update, keeping the ids of unchanged rules so a rerun leaves the JSON as it was.

    GX 1.24.1 means to do this itself, but its equality includes the id, so it never matches."""
    from great_expectations.exceptions import DataContextError

    try:
        old = {spec_key(e): e.id for e in ctx.suites.get(suite.name).expectations}
    except DataContextError:  # no suite yet
        old = {}
    for e in suite.expectations:
        e.id = old.get(spec_key(e), e.id)
    return ctx.suites.add_or_update(suite)


def batch_definition(ctx, recipe: str):
    """Get or create pandas datasource -> dataframe asset -> whole-table batch definition.

    Get-or-create, not add_or_update: GX's add_or_update_pandas drops the assets and re-adds them
    with fresh ids, rewriting the committed great_expectations.yml on every run."""
    try:
        source = ctx.data_sources.get(DATASOURCE)
    except KeyError:
        source = ctx.data_sources.add_pandas(DATASOURCE)
    names = {a.name for a in source.assets}
    asset = source.get_asset(recipe) if recipe in names else source.add_dataframe_asset(recipe)
    if BATCH in {b.name for b in asset.batch_definitions}:
        return asset.get_batch_definition(BATCH)
    return asset.add_batch_definition_whole_dataframe(BATCH)


def checkpoint(ctx, suite, result_format: str):
    """Validation definition + checkpoint for the recipe (add_or_update: unchanged objects keep their files)."""
    import great_expectations as gx

    vd = ctx.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite.name, data=batch_definition(ctx, suite.name), suite=suite))
    return ctx.checkpoints.add_or_update(gx.Checkpoint(
        name=suite.name, validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
        result_format={"result_format": result_format}))


def init_suite(cfg: RecipeConfig, recipe: Recipe, paths: Paths) -> Path:
    """Write <root>/gx (config, suite, checkpoint) for a recipe; rerunning with the same params changes nothing."""
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = open_context(paths.root)
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    ctx.variables.save()  # persisted, so every later context (and the committed yml) is quiet
    suite = save_suite(ctx, build_suite(cfg, recipe))
    checkpoint(ctx, suite, cfg.validate.result_format)
    return paths.suite(cfg.name)
