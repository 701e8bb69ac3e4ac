"""Publish a recipe's metrics as a Prefect table artifact."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_table_artifact

from coursepipe.paths import Paths


@task(name="report", task_run_name="report@{recipe}")
def report(recipe: str, root: str) -> dict:
    """Read metrics/<recipe>.json and attach it to the flow run as a table."""
    metrics = json.loads(Paths(root).metrics(recipe).read_text())
    rows = [{"metric": k, "value": v} for k, v in sorted(metrics.items())]
    create_table_artifact(key=f"{recipe.replace('_', '-')}-metrics", table=rows,
                          description=f"{recipe}: metrics of the latest pipeline run")
    return metrics
