"""fetch, then one task per DVC stage: `dvc repro <stage>@<recipe>` in a subprocess.

Running the DVC CLI (not its Python API, which is bound to the process's cwd) leaves the
workspace exactly as a hand-run `dvc repro` would: outputs in the cache, dvc.lock current, and
up-to-date stages skipped.
"""
from __future__ import annotations

import sys

from prefect import task

from coursepipe.stages import STAGES
from tasks.shell import stream


@task(name="fetch", retries=2, retry_delay_seconds=10, task_run_name="fetch@{recipe}")
def fetch(recipe: str, root: str) -> None:
    """Fetch the recipe's source archive into data/, then `dvc add data` + `dvc push`."""
    stream([sys.executable, "-m", "coursepipe.cli", "fetch", recipe], cwd=root)


def _stage_task(stage: str):
    @task(name=stage, task_run_name=f"{stage}@{{recipe}}")
    def run_stage(recipe: str, root: str) -> None:
        stream([sys.executable, "-m", "dvc", "repro", f"{stage}@{recipe}"], cwd=root)
    run_stage.__doc__ = f"`dvc repro {stage}@<recipe>`, streamed into the Prefect log."
    return run_stage


STAGE_TASKS = {stage: _stage_task(stage) for stage in STAGES}
