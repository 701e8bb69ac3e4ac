"""validate stage: the committed GX suite against prepared data (real Great Expectations, file context)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from coursepipe.config import ConfigError
from audit import run_stage
from coursepipe import recipes
from coursepipe.recipes import adult as adult_module
from coursepipe.stages import prepare
from coursepipe.stages.validate import ValidationFailed, run
from coursepipe.validation.suites import expectation_specs, init_suite


def tamper(paths, change) -> None:
    """Rewrite the prepared table through `change(df) -> df`, as a bad extract would leave it."""
    path = paths.prepared("adult") / prepare.TABLE
    change(pd.read_parquet(path)).to_parquet(path, index=False)


def training_rows(df: pd.DataFrame, n: int) -> pd.Index:
    return df.index[~df["is_valid"]][:n]


def committed_files(gx_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(gx_dir)): p.read_bytes() for p in sorted(gx_dir.rglob("*"))
            if p.is_file() and "uncommitted" not in p.parts}


def failure(cfg, paths) -> str:
    with pytest.raises(ValidationFailed) as e:
        run(cfg, recipes.get("adult"), paths)
    report = json.loads(paths.validation_report("adult").read_text())
    assert report["success"] is False and report["failed"] >= 1  # written before raising
    return str(e.value)


def test_clean_data_passes_quietly_and_leaves_committed_gx_alone(prepared, adult_cfg, capfd):
    before = committed_files(prepared.gx)
    result = run_stage("validate", adult_cfg, recipes.get("adult"), prepared)  # audited

    assert result.success and result.failed == 0
    suite = json.loads(prepared.suite("adult").read_text())
    assert result.evaluated == len(suite["expectations"]) > 30
    report = json.loads(result.report.read_text())
    assert report["success"] and report["rows"] == 2000 and report["suite_matches_params"]
    assert {r["type"] for r in report["expectations"]} >= {
        "expect_table_columns_to_match_set", "expect_column_values_to_be_in_set",
        "expect_column_values_to_be_between", "expect_column_values_to_not_be_null"}
    occupation_nulls = next(r for r in report["expectations"] if r["column"] == "occupation"
                            and r["type"] == "expect_column_values_to_not_be_null")
    assert occupation_nulls["success"] and occupation_nulls["unexpected_count"] > 0  # tolerated
    assert (prepared.root / report["data_docs"]).is_file() and result.data_docs.name == "index.html"
    # a second run (add_or_update of the checkpoint) must not rewrite committed files either
    run(adult_cfg, recipes.get("adult"), prepared)
    assert committed_files(prepared.gx) == before
    assert "Calculating Metrics" not in capfd.readouterr().err


def test_missing_column_fails_naming_it(prepared, adult_cfg):
    tamper(prepared, lambda df: df.drop(columns=["education"]))
    msg = failure(adult_cfg, prepared)
    assert "expect_table_columns_to_match_set: missing ['education']" in msg
    assert "column 'education'" in msg


def test_bad_values_fail_naming_column_rule_and_values(prepared, adult_cfg):
    def break_rows(df):  # three faults in three columns, one validation run for all
        rows = training_rows(df, 12)
        df.loc[rows[:7], "workclass"] = "Pirate"          # unknown category
        df.loc[rows[7:10], "salary"] = ">50K"            # target outside its classes
        df.loc[rows[10:], "age"] = [150.0, -1.0]          # numbers out of range
        return df

    tamper(prepared, break_rows)
    msg = failure(adult_cfg, prepared)
    assert "(3 of " in msg
    assert "column 'workclass' expect_column_values_to_be_in_set: 7 rows" in msg and "['Pirate']" in msg
    assert "column 'salary' expect_column_values_to_be_in_set: 3 rows" in msg and "['>50K']" in msg
    assert "column 'age' expect_column_values_to_be_between: 2 rows" in msg and "outside [16" in msg
    report = json.loads(prepared.validation_report("adult").read_text())
    (age,) = [r for r in report["expectations"] if not r["success"] and r["column"] == "age"]
    assert sorted(age["examples"]) == [-1.0, 150.0] and age["unexpected_count"] == 2

    # a policy tolerating 1% unknown categories lets 7 of ~1900 workclass values through
    lenient = dataclasses.replace(adult_cfg, validate=dataclasses.replace(
        adult_cfg.validate, unknown_category=0.01))
    init_suite(lenient, recipes.get("adult"), prepared)
    msg = failure(lenient, prepared)
    assert "(2 of " in msg and "Pirate" not in msg and "'salary'" in msg


def test_hand_edited_suite_is_honoured(prepared, adult_cfg):
    path = prepared.suite("adult")
    suite = json.loads(path.read_text())
    (age_range,) = [e for e in suite["expectations"] if e["type"] == "expect_column_values_to_be_between"
                    and e["kwargs"]["column"] == "age"]
    age_range["kwargs"]["max_value"] = 60  # the synthetic ages reach 90
    suite["expectations"].append({"type": "expect_column_values_to_be_in_set",  # no id: hand-written
                                  "kwargs": {"column": "sex", "value_set": ["Female"]}})
    path.write_text(json.dumps(suite, indent=2))

    msg = failure(adult_cfg, prepared)
    assert "column 'age' expect_column_values_to_be_between" in msg and "outside [16.0, 60" in msg
    assert "column 'sex' expect_column_values_to_be_in_set" in msg and "['Male']" in msg
    report = json.loads(prepared.validation_report("adult").read_text())
    assert report["suite_matches_params"] is False and report["evaluated"] == len(suite["expectations"])


def test_missing_suite_names_the_command(prepared, adult_cfg):
    prepared.suite("adult").unlink()
    with pytest.raises(FileNotFoundError, match="coursepipe gx-init adult"):
        run(adult_cfg, recipes.get("adult"), prepared)


def test_init_suite_writes_a_quiet_stable_context(tmp_path, adult_cfg):
    from coursepipe.paths import Paths

    paths = Paths(tmp_path)
    suite_path = init_suite(adult_cfg, recipes.get("adult"), paths)
    first = committed_files(paths.gx)
    assert init_suite(adult_cfg, recipes.get("adult"), paths) == suite_path and committed_files(paths.gx) == first
    assert "globally: false" in (paths.gx / "great_expectations.yml").read_text()
    assert "uncommitted/" in (paths.gx / ".gitignore").read_text()

    rules = {(e["type"], e["kwargs"].get("column")): e["kwargs"]
             for e in json.loads(suite_path.read_text())["expectations"]}
    assert rules[("expect_column_values_to_not_be_null", "occupation")]["mostly"] == \
        pytest.approx(1 - adult_cfg.validate.max_null_by_column["occupation"])
    assert "mostly" not in rules[("expect_column_values_to_not_be_null", "salary")]
    assert rules[("expect_column_values_to_be_in_set", "workclass")]["value_set"] == \
        list(adult_module.CATEGORIES["workclass"])
    assert rules[("expect_table_row_count_to_be_between", None)]["min_value"] == adult_cfg.validate.min_rows


def test_null_policy_may_only_name_real_columns(adult_cfg):
    bad = dataclasses.replace(adult_cfg.validate, max_null_by_column={"salary": 0.1})
    with pytest.raises(ConfigError, match="target 'salary' may not be missing"):
        expectation_specs(recipes.get("adult"), bad)
    bad = dataclasses.replace(adult_cfg.validate, max_null_by_column={"wrkclass": 0.1})
    with pytest.raises(ConfigError, match="wrkclass"):
        expectation_specs(recipes.get("adult"), bad)


def test_a_failed_rule_message_stays_short_with_the_full_list_in_the_report():
    from coursepipe.stages.validate import describe

    groups = [" = ".join(f"images/{g}_{k}_{'x' * 40}.png" for k in range(3)) for g in range(50)]
    rule = {"type": "expect_column_values_to_be_in_set", "column": "duplicate", "success": False,
            "unexpected_count": 150, "unexpected_percent": 7.5, "examples": groups,
            "observed_value": None, "missing": [], "unexpected": [], "mostly": None, "error": None}
    text = describe(rule)
    assert len(text) < 400, text
    assert "3 copies, e.g. images/0_0_" in text and "and 47 more in the report" in text
    assert rule["examples"] == groups   # the report keeps every group


def test_a_rule_given_twice_is_written_once(tmp_path, adult_cfg):
    """A recipe may repeat a generic rule (its own not-null check of a column, say): gx-init
    keeps one copy, so the suite saves and a rerun leaves it as it was."""
    from coursepipe.paths import Paths

    twice = ("expect_column_values_to_not_be_null", {"column": "salary"})  # the schema's own too
    adult = dataclasses.replace(recipes.get("adult"), expectations=lambda v: [twice, twice])
    assert expectation_specs(adult, adult_cfg.validate).count(twice) == 1
    paths = Paths(tmp_path)
    suite_path = init_suite(adult_cfg, adult, paths)
    first = suite_path.read_text()
    rules = [(e["type"], e["kwargs"]) for e in json.loads(first)["expectations"]]
    assert rules.count(twice) == 1 and len(rules) == len(expectation_specs(adult, adult_cfg.validate))
    init_suite(adult_cfg, adult, paths)
    assert suite_path.read_text() == first
