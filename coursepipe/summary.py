"""The run summary a person reads at a glance: recipe, headline metric, the course's result, seconds.

Read from the stage outputs (metrics/<recipe>.json, models/<recipe>/train.json), so it works
after `dvc repro`, a Prefect flow or `pipeline` alike; a recipe not run yet shows as "not run", and
one with no course result of its own (the ULMFiT chain's language models) shows "-" for it.
"""
from __future__ import annotations

import json

from coursepipe.paths import Paths


def rows(paths: Paths, recipes: list) -> list[dict]:
    """One row per Recipe object (the doors look them up; nothing here does)."""
    out = []
    for recipe in recipes:
        name, course = recipe.name, recipe.course
        metric = course[0] if course else None
        row = {"recipe": name, "metric": metric or "-", "value": None,
               "course": course[1] if course else None, "train_s": None,
               "ran": paths.metrics(name).is_file()}
        if row["ran"]:
            row["value"] = json.loads(paths.metrics(name).read_text()).get(metric)
        summary = paths.model(name) / "train.json"
        if summary.is_file():
            row["train_s"] = json.loads(summary.read_text()).get("train_seconds")
        out.append(row)
    return out


def table(rows: list[dict]) -> str:
    """Plain fixed-width text: readable in a terminal, a log file and a CI page."""
    def fmt(v, spec, missing="not run"):
        return missing if v is None else format(v, spec)
    lines = [f"{'recipe':<15}{'metric':<10}{'value':>9}{'course':>9}{'train s':>9}"]
    for r in rows:
        value = fmt(r["value"], ".4f", "-" if r["ran"] else "not run")  # ran, but nothing to show
        lines.append(f"{r['recipe']:<15}{r['metric']:<10}{value:>9}"
                     f"{fmt(r['course'], '.3f', '-'):>9}{fmt(r['train_s'], '.1f'):>9}")
    return "\n".join(lines)
