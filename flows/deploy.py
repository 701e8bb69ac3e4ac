"""Scheduled retraining: one deployment per recipe, cron and timezone from params.yaml.

    python -m flows.deploy register   # record the deployments with the Prefect API (no worker needed)
    python -m flows.deploy serve      # register and keep running them on schedule (blocks)

Schedules only fire against a real Prefect server (`prefect server start`, PREFECT_API_URL
set): the ephemeral API that a plain flow call starts never creates scheduled runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from prefect.schedules import Cron

from coursepipe.recipes import load_params as load
from coursepipe.paths import Paths
from flows.course import course


def deployment_name(recipe: str) -> str:
    return f"nightly-{recipe.replace('_', '-')}"


def deployments(root: str = ".", recipes: list[str] | None = None) -> list:
    """One RunnerDeployment of the `course` flow per recipe, with its cron schedule."""
    root = str(Path(root).resolve())
    params = load(Paths(root).params)
    names = recipes or list(params.recipes)
    return [course.to_deployment(
                name=deployment_name(name),
                schedule=Cron(params.recipe(name).schedule.cron,
                              timezone=params.recipe(name).schedule.timezone),
                parameters={"recipe": name, "root": root},
                description=f"Retrain {name} on schedule: fetch, dvc repro its stages, publish metrics.",
                tags=["course", name])
            for name in names]


def register(root: str = ".", recipes: list[str] | None = None) -> list:
    """Create or update the deployments; returns their ids."""
    return [d.apply() for d in deployments(root, recipes)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["register", "serve"])
    p.add_argument("--root", default=".")
    p.add_argument("--recipe", action="append", help="limit to these recipes (repeatable)")
    args = p.parse_args(argv)
    if args.action == "register":
        for dep_id, d in zip(register(args.root, args.recipe), deployments(args.root, args.recipe)):
            print(f"course/{d.name}: {dep_id}")
    else:
        from prefect import serve
        serve(*deployments(args.root, args.recipe))


if __name__ == "__main__":  # required: Prefect's runners re-import this module
    main()
