"""The recipe contract: every recipe is one typed Recipe over a Kind, the contract fails loudly by
name, and nothing below the doors looks a recipe up by name (the stages get the object).

The param audit and the code-deps audit (tests/audit.py) run inside each recipe's own end-to-end
test, on real stages: test_mnist, test_pets (pets, own_images), test_movielens, test_human_numbers,
and for adult test_validate / test_train / test_evaluate_export / conftest's `prepared`."""
from __future__ import annotations

import ast
import sys
import textwrap
from dataclasses import dataclass

import pytest

from audit import REPO, closure, declared, module_level_imports
from coursepipe import recipes
from coursepipe.config import ConfigError, Section
from coursepipe.contract import ContractError, Kind, Recipe, Schema
from coursepipe.kinds.tabular import TabularClassification, TabularModel


def test_every_recipe_is_a_typed_recipe_over_a_kind():
    assert set(recipes.names()) == {"adult", "camvid", "head_pose", "human_numbers", "imdb", "imdb_lm",
                                    "imdb_pretrain", "mnist", "movielens", "own_images", "pets", "planet"}
    params = recipes.load_params(REPO / "params.yaml")
    for name in recipes.names():
        recipe = recipes.get(name)
        assert isinstance(recipe, Recipe) and recipe.name == name
        assert isinstance(recipe.kind, Kind) and isinstance(recipe.schema, Schema)
        cfg = params.recipe(name)
        for section, tp in recipe.config_types.items():
            assert isinstance(getattr(cfg, section), tp), (name, section)
        assert recipe.model_config in recipe.kind.model_configs
        # the kind's portable module is importable and defines the export protocol
        port = __import__(recipe.kind.portable, fromlist=["load"])
        assert all(callable(getattr(port, f)) for f in ("load", "outputs", "finish", "predict_frame", "main"))


def tiny_recipe(**changes) -> Recipe:
    fields = dict(name="tiny", kind=TabularClassification(),
                  schema=Schema(columns=("a", "y"), target="y", ranges={"a": (0, 1)}, classes=("0", "1")),
                  model_config=TabularModel, synthesize=lambda rows, seed: b"",
                  read_raw=lambda path, p: None, normalise=lambda df: df)
    fields.update(changes)
    return Recipe(**{k: v for k, v in fields.items() if v is not ...})


def test_a_recipe_missing_a_required_field_fails_naming_it():
    with pytest.raises(TypeError, match="'synthesize'"):
        tiny_recipe(synthesize=...)
    with pytest.raises(TypeError, match="'read_raw'"):
        tiny_recipe(read_raw=...)
    with pytest.raises(TypeError, match="positional"):   # keyword-only: no positional mix-ups
        Recipe("tiny")


def test_the_registry_names_the_recipe_module_that_breaks_the_contract(tmp_path, monkeypatch):
    pkg = REPO / "coursepipe" / "recipes"
    bad = pkg / "zz_broken.py"
    bad.write_text(textwrap.dedent("""
        from coursepipe.contract import Recipe
        RECIPE = Recipe(name="zz_broken")
    """))
    try:
        with pytest.raises(ContractError, match=r"coursepipe/recipes/zz_broken\.py: .*missing .*'kind'"):
            recipes.get("zz_broken")
    finally:
        bad.unlink()
        sys.modules.pop("coursepipe.recipes.zz_broken", None)
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        recipes.get("nope")


def test_a_misspelt_kind_member_fails_at_definition():
    with pytest.raises(ContractError, match=r"defines \['callback'\].*misspelt"):
        class Sloppy(TabularClassification):  # noqa: F841
            def callback(self, recipe, m, t):  # not Kind.callbacks: would never be called
                return []


def test_a_kind_missing_an_abstract_method_cannot_be_built():
    class Half(Kind):
        name, portable, model_configs = "half", "coursepipe.export.portable_tabular", (TabularModel,)

    with pytest.raises(TypeError, match="abstract"):
        Half()


def test_a_recipe_must_use_its_kinds_sections():
    @dataclass(frozen=True)
    class Other(Section):
        x: int

    with pytest.raises(ContractError, match="model_config Other is not one of kind tabular_classification"):
        tiny_recipe(model_config=Other)
    with pytest.raises(ContractError, match="prepare_config must subclass Prepare"):
        tiny_recipe(prepare_config=Other)
    with pytest.raises(ContractError, match="kind must be a Kind"):
        tiny_recipe(kind="tabular")


def test_a_schema_may_only_name_its_own_columns():
    with pytest.raises(ContractError, match=r"\['b'\]"):
        Schema(columns=("a", "y"), target="y", ranges={"b": (0, 1)})


# ----------------------------------------------------------------------------- layering

def imports_of(path) -> set[str]:
    """Every module a file imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def project_files():
    return sorted((REPO / "coursepipe").rglob("*.py"))


def test_nothing_below_the_doors_looks_a_recipe_up_by_name():
    doors = {"coursepipe/cli.py", "coursepipe/recipes/__init__.py"}
    offenders = []
    for path in project_files():
        rel = path.relative_to(REPO).as_posix()
        if rel in doors or rel.startswith("coursepipe/recipes/"):
            continue
        # the registry (coursepipe.recipes, the package) is the doors' alone
        hits = sorted(m for m in imports_of(path) if m in ("coursepipe.recipes", "coursepipe.recipes.get",
                                                            "coursepipe.recipes.load_params")
                      or m.startswith("coursepipe.recipes."))
        if hits:
            offenders.append(f"{rel}: {hits}")
    assert not offenders, offenders


def test_recipes_import_no_stage_and_no_other_recipe():
    offenders = []
    for path in sorted((REPO / "coursepipe" / "recipes").glob("*.py")):
        if path.name == "__init__.py":
            continue
        own = f"coursepipe.recipes.{path.stem}"
        for m in imports_of(path):
            if m.startswith("coursepipe.stages") or (m.startswith("coursepipe.recipes") and m != own):
                offenders.append(f"{path.name}: {m}")
    assert not offenders, offenders


def test_the_config_loader_imports_no_recipe_and_no_kind():
    assert not {m for m in closure({"coursepipe.config"})} - {"coursepipe", "coursepipe.config"}
    assert module_level_imports("coursepipe.contract") <= {"coursepipe.config"}


def test_every_stage_declares_the_recipes_sections_it_is_named_for():
    """dvc.yaml's params follow one rule: each stage depends on its own sections (+ defaults)."""
    expected = {"prepare": {"recipes.r.source", "recipes.r.sources", "defaults.prepare", "recipes.r.prepare"},
                "validate": {"defaults.validate", "recipes.r.validate"},
                "train": {"recipes.r.model", "recipes.r.starts_from", "defaults.train", "recipes.r.train"},
                "evaluate": {"defaults.evaluate", "recipes.r.evaluate"},
                "export": {"defaults.export", "recipes.r.export"}}
    for stage, params in expected.items():
        assert set(declared(stage, "r")[0]) == params, stage


def test_the_run_summary_shows_metric_course_result_and_seconds(tmp_path):
    import json

    from coursepipe import summary
    from coursepipe.paths import Paths

    paths = Paths(tmp_path)
    paths.metrics("adult").parent.mkdir(parents=True)
    paths.metrics("adult").write_text(json.dumps({"accuracy": 0.8326, "n_valid": 6512}))
    paths.model("adult").mkdir(parents=True)
    (paths.model("adult") / "train.json").write_text(json.dumps({"train_seconds": 0.81}))
    paths.metrics("imdb_lm").write_text(json.dumps({"accuracy": 0.26, "perplexity": 91.0}))
    rows = summary.rows(paths, [recipes.get("adult"), recipes.get("movielens"), recipes.get("imdb_lm")])
    assert rows[0] == {"recipe": "adult", "metric": "accuracy", "value": 0.8326, "course": 0.82, "train_s": 0.81,
                       "ran": True}
    assert rows[1]["metric"] == "mse" and rows[1]["value"] is None and not rows[1]["ran"]
    text = summary.table(rows).splitlines()
    assert text[1].split() == ["adult", "accuracy", "0.8326", "0.820", "0.8"]
    assert text[2].split() == ["movielens", "mse", "not", "run", "0.815", "not", "run"]
    # a language model of the ULMFiT chain ran, but the course states no result for it
    assert text[3].split() == ["imdb_lm", "-", "-", "-", "not", "run"]
    assert len(text) == 4 and max(map(len, text)) <= 60
