"""validate: the prepared table against the committed Great Expectations suite, before any training.

Reads prepared/<recipe>/table.parquet and gx/expectations/<recipe>.json. The suite is never
regenerated here (`coursepipe gx-init` does that), so a hand-edited suite is what runs. Writes
reports/<recipe>/validation.json and Data Docs under gx/uncommitted/data_docs/, then, if any rule
failed, raises ValidationFailed naming each failed rule's column, expectation and bad values.
Reads params: validate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from coursepipe.config import RecipeConfig
from coursepipe.contract import Recipe
from coursepipe.io import file_digest, write_json
from coursepipe.paths import Paths
from coursepipe.stages import prepare


class ValidationFailed(RuntimeError):
    """The data broke rules of the committed suite; the message names each one."""


@dataclass
class ValidateResult:
    success: bool
    evaluated: int          # rules run
    failed: int             # rules broken
    report: Path            # reports/<recipe>/validation.json
    data_docs: Path         # Data Docs index.html


# ----------------------------------------------------------------------------- reading GX results

def jsonable(x: Any) -> Any:
    """GX result values as strict JSON: numpy scalars to Python, NaN / NA to null."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()  # numpy scalar
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return None if math.isnan(x) else x
    return None if str(x) in ("<NA>", "NaT") else str(x)


def examples(result: dict, n: int) -> list:
    """Up to n distinct non-missing bad values, most frequent first."""
    counts = result.get("partial_unexpected_counts")
    values = [c["value"] for c in counts] if counts else result.get("partial_unexpected_list") or []
    out: list = []
    for v in jsonable(values):
        if v is not None and v not in out:
            out.append(v)
    return out[:n]


def error_message(info: dict | None) -> str | None:
    """The exception GX caught while evaluating a rule (e.g. a missing column), if any."""
    if not info:
        return None
    if "raised_exception" in info:  # flat form, or one entry per metric
        messages = [info.get("exception_message")] if info["raised_exception"] else []
    else:
        messages = [v.get("exception_message") for v in info.values()
                    if isinstance(v, dict) and v.get("raised_exception", True)]
    messages = [m for m in messages if m]
    return messages[0].removeprefix("Error: ") if messages else None


def rule_report(r, n_examples: int) -> dict:
    """One expectation's outcome as plain JSON."""
    conf, res = r.expectation_config, r.result or {}
    mismatched = (res.get("details") or {}).get("mismatched") or {}
    out = {
        "type": conf.type,
        "column": conf.kwargs.get("column"),
        "success": bool(r.success),
        "unexpected_count": jsonable(res.get("unexpected_count")),
        "unexpected_percent": jsonable(res.get("unexpected_percent")),
        "examples": examples(res, n_examples),
        "observed_value": jsonable(res.get("observed_value")),
        # sets: columns the table lacks / has extra; classes a column never shows
        "missing": jsonable(mismatched.get("missing") or res.get("partial_missing_list") or []),
        "unexpected": jsonable(mismatched.get("unexpected") or []),
        "mostly": conf.kwargs.get("mostly"),
        "error": error_message(r.exception_info),
    }
    for bound in ("min_value", "max_value"):
        if bound in conf.kwargs:
            out[bound] = jsonable(conf.kwargs[bound])
    return out


def bounds(rule: dict) -> str:
    lo, hi = rule.get("min_value"), rule.get("max_value")
    return f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"[{lo}, {hi}]"


MESSAGE_EXAMPLES = 3     # bad values quoted per rule in the one-line message (the report has all)
EXAMPLE_CHARS = 80       # longer values are cut in the message


def short(value) -> str:
    """One bad value for the message: a duplicate group `a.png = b.png = ...` as `N copies, e.g.
    a.png`, anything long cut to EXAMPLE_CHARS."""
    text = str(value)
    if " = " in text:
        parts = text.split(" = ")
        text = f"{len(parts)} copies, e.g. {parts[0]}"
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS - 3] + "..."


def quoted(examples: list) -> str:
    shown = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else short(v)
             for v in examples[:MESSAGE_EXAMPLES]]
    more = len(examples) - len(shown)
    return f"{shown}" + (f" and {more} more in the report" if more > 0 else "")


def describe(rule: dict) -> str:
    """`column 'x' expect_...: 57 rows (2.9%) e.g. ['Pirate']` for one failed rule."""
    where = f"column {rule['column']!r}" if rule["column"] else "table"
    bits = []
    if rule["error"]:
        bits.append(f"error: {rule['error']}")
    if rule["unexpected_count"] is not None:
        text = f"{rule['unexpected_count']} rows ({rule['unexpected_percent'] or 0:.1f}%)"
        if rule["mostly"] is not None:
            text += f", {1 - rule['mostly']:.1%} tolerated"
        if "min_value" in rule or "max_value" in rule:
            text += f" outside {bounds(rule)}"
        if rule["examples"]:
            text += f" e.g. {quoted(rule['examples'])}"
        bits.append(text)
    elif rule["observed_value"] is not None:
        text = f"observed {rule['observed_value']!r}"
        if "min_value" in rule or "max_value" in rule:
            text += f", expected {bounds(rule)}"
        if not (rule["missing"] or rule["unexpected"]):
            bits.append(text)
    if rule["missing"]:
        bits.append(f"missing {rule['missing']}")
    if rule["unexpected"]:
        bits.append(f"unexpected {rule['unexpected']}")
    return f"{where} {rule['type']}: {', '.join(bits) or 'failed'}"


def failure_message(recipe: str, rules: list[dict], report: str) -> str:
    # table rules (columns, row count) first: a missing column explains the column rules after it
    failed = sorted((r for r in rules if not r["success"]), key=lambda r: r["column"] is not None)
    listed = "; ".join(describe(r) for r in failed)
    return f"{recipe} validation failed ({len(failed)} of {len(rules)} rules): {listed} (report: {report})"


def docs_index(ctx, root: Path) -> Path:
    """The local Data Docs index.html, from GX's own file:// URL."""
    url = ctx.get_docs_sites_urls()[0]["site_url"]
    return Path(unquote(urlparse(url).path)).relative_to(root)


# ----------------------------------------------------------------------------- the stage

def check_suite_file(path: Path, recipe: str) -> None:
    """The committed suite must exist and parse; checked before GX scaffolds an empty gx/."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `coursepipe gx-init {recipe}` and commit gx/")
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def matches_params(suite, cfg: RecipeConfig, recipe: Recipe) -> bool:
    """Whether the committed suite is what gx-init would write from today's params (else: edited or stale)."""
    from coursepipe.validation.suites import build_suite, spec_key

    keys = sorted(spec_key(e) for e in suite.expectations)
    return keys == sorted(spec_key(e) for e in build_suite(cfg, recipe).expectations)


def run(cfg: RecipeConfig, recipe: Recipe, paths: Paths) -> ValidateResult:
    from coursepipe.validation.suites import checkpoint, open_context

    check_suite_file(paths.suite(cfg.name), cfg.name)
    df = prepare.load(paths, cfg.name)
    ctx = open_context(paths.root)
    suite = ctx.suites.get(cfg.name)  # the committed file, as edited; never rebuilt here
    outcome = checkpoint(ctx, suite, cfg.validate.result_format).run(batch_parameters={"dataframe": df})
    (validation,) = outcome.run_results.values()
    rules = [rule_report(r, cfg.validate.examples) for r in validation.results]
    failed = sum(not r["success"] for r in rules)
    report_path, docs = paths.validation_report(cfg.name), docs_index(ctx, paths.root)
    write_json(report_path, {
        "recipe": cfg.name,
        "success": failed == 0,
        "rows": len(df),
        "evaluated": len(rules),
        "failed": failed,
        "suite": str(paths.suite(cfg.name).relative_to(paths.root)),
        "suite_matches_params": matches_params(suite, cfg, recipe),
        "table_sha256": file_digest(paths.prepared(cfg.name) / prepare.TABLE),
        "data_docs": str(docs),
        "expectations": rules,
    })
    if failed:  # the report is on disk first, so a person can read it
        raise ValidationFailed(failure_message(cfg.name, rules, str(report_path.relative_to(paths.root))))
    return ValidateResult(success=True, evaluated=len(rules), failed=0, report=report_path,
                          data_docs=paths.root / docs)
