"""Start-up of a train stage with and without the warm cluster (issue 12).

    python bench/startup.py                              # adult, 3 runs each way
    python bench/startup.py --recipe human_numbers --runs 2

One command: the recipe's synthetic sample is fetched, prepared and validated once in a temp
project; then `coursepipe train <recipe>` (the process `dvc repro train@<recipe>` runs) is timed
`--runs` times with no cluster to join (each starts and stops its own Ray instance), and `--runs`
times joined to one warm head (coursepipe.distributed.cluster.warm, what `./run course` and the
Prefect flows start once per run; its own start is printed apart). Ray's run storage is emptied
before each run, so every run trains from scratch. Per run: the process's wall seconds and the
train stage's `startup_seconds` (wall minus rank 0's epoch loop, from models/<recipe>/train.json).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from memory import REPO, cli  # noqa: E402


def project(work: Path, recipe: str) -> Path:
    """A project root with `recipe` fetched, prepared and validated (its synthetic sample)."""
    root = work / f"root-{recipe}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["recipes"] = {recipe: raw["recipes"][recipe]}
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(REPO / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    for step in (("fetch", recipe, "--no-dvc"), ("prepare", recipe), ("validate", recipe)):
        cli(root, *step)
    return root


def timed_train(root: Path, recipe: str) -> tuple[float, float]:
    """(wall s, startup_seconds) of one `coursepipe train` from scratch."""
    raw = yaml.safe_load((root / "params.yaml").read_text())
    shutil.rmtree(root / raw["ray_storage"], ignore_errors=True)
    t0 = time.perf_counter()
    cli(root, "train", recipe)
    wall = time.perf_counter() - t0
    summary = json.loads((root / "models" / recipe / "train.json").read_text())
    return wall, summary["startup_seconds"]


def main(argv: list[str] | None = None) -> None:
    from coursepipe.distributed import cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="adult")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/coursepipe-bench-startup")
    args = ap.parse_args(argv)
    if os.environ.get("RAY_ADDRESS"):
        raise SystemExit("RAY_ADDRESS is set: unset it, the cold runs must start their own Ray")
    root = project(Path(args.work), args.recipe)
    print(f"load average at start: {os.getloadavg()[0]:.1f}; {args.recipe}, {args.runs} runs each way",
          flush=True)
    rows = {"cold": [], "warm": []}
    for _ in range(args.runs):
        rows["cold"].append(timed_train(root, args.recipe))
        print(f"  no cluster:   wall {rows['cold'][-1][0]:5.1f} s, start-up {rows['cold'][-1][1]:5.1f} s", flush=True)
    t0 = time.perf_counter()
    with cluster.warm():
        head = time.perf_counter() - t0
        for _ in range(args.runs):
            rows["warm"].append(timed_train(root, args.recipe))
            print(f"  warm cluster: wall {rows['warm'][-1][0]:5.1f} s, start-up {rows['warm'][-1][1]:5.1f} s",
                  flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.1f}; the warm head took {head:.1f} s to start, once")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(s for _, s in v)) for k, v in rows.items()}
    for k, (w, s) in med.items():
        print(f"{k}: median wall {w:.1f} s, median start-up {s:.1f} s per train stage")
    print(f"ratio warm / cold: wall {med['warm'][0] / med['cold'][0]:.2f}x, "
          f"start-up {med['warm'][1] / med['cold'][1]:.2f}x")


if __name__ == "__main__":
    main()
