"""Prefect flows: a recipe's pipeline (fetch -> DVC stages -> metrics artifact), or all recipes.

    python -m flows.course --recipe adult      # one recipe
    python -m flows.course --all               # every recipe in params.yaml, one at a time

A flow run starts one local Ray head for all of its train stages and stops it at the end, also
when a stage fails (coursepipe/distributed/cluster.py); with RAY_ADDRESS set, the stages join
that cluster instead and nothing is started.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from prefect import flow

from coursepipe import summary
from coursepipe.distributed import cluster
from coursepipe.recipes import get
from coursepipe.recipes import load_params as load
from coursepipe.paths import Paths
from coursepipe.stages import STAGES
from tasks.report import report
from tasks.stages import STAGE_TASKS, fetch


def upstream_chain(params, recipe: str) -> list[str]:
    """The recipes whose trained models this one starts from (starts_from), first to last, then
    itself: imdb -> [imdb_pretrain, imdb_lm, imdb]."""
    chain = [recipe]
    while (up := params.recipe(chain[0]).upstream) is not None and up not in chain:
        chain.insert(0, up)
    return chain


@flow(name="course", flow_run_name="course-{recipe}", log_prints=True)
def course(recipe: str = "adult", root: str = ".", warm_cluster: bool = True,
           fetched: list[str] | None = None) -> dict:
    """One recipe end to end; returns its metrics. `fetched`: recipes whose sources this run
    has fetched already (course_all: an upstream recipe that ran before this one)."""
    root = str(Path(root).resolve())
    params = load(Paths(root).params)  # fail fast on malformed params / unknown recipe
    with cluster.warm() if warm_cluster else contextlib.nullcontext():
        for name in upstream_chain(params, recipe):  # DVC re-runs their stages; it cannot fetch
            if name not in (fetched or ()):
                fetch(name, root)
        for stage in STAGES:
            STAGE_TASKS[stage](recipe, root)
    return report(recipe, root)


@flow(name="course-all", log_prints=True)
def course_all(root: str = ".", recipes: list[str] | None = None,
               warm_cluster: bool = True) -> dict[str, dict]:
    """Every recipe (or the given ones) in turn, on one Ray head: DVC's repo lock and 2 cores
    favour one at a time."""
    root = str(Path(root).resolve())
    params = load(Paths(root).params)
    names = recipes or list(params.recipes)
    results: dict[str, dict] = {}
    fetched: list[str] = []
    with cluster.warm() if warm_cluster else contextlib.nullcontext():
        for name in names:
            # the subflows join this run's head (RAY_ADDRESS) or, without it, start none either;
            # an upstream recipe fetched for an earlier one is not fetched again (~5 s each)
            results[name] = course(name, root, warm_cluster=warm_cluster, fetched=list(fetched))
            fetched += [n for n in upstream_chain(params, name) if n not in fetched]
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--recipe", help="run one recipe")
    which.add_argument("--all", action="store_true", help="run every recipe in params.yaml")
    p.add_argument("--root", default=".", help="project root (default: .)")
    p.add_argument("--no-warm-cluster", dest="warm", action="store_false",
                   help="let every train stage start its own Ray (default: one head for the run)")
    args = p.parse_args(argv)
    result = (course_all(args.root, warm_cluster=args.warm) if args.all
              else {args.recipe: course(args.recipe, args.root, warm_cluster=args.warm)})
    print(summary.table(summary.rows(Paths(args.root), [get(name) for name in result])))


if __name__ == "__main__":  # required: Prefect's runners re-import this module
    main()
