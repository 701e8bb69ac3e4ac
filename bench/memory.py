"""Peak memory of the train stage's driver and Ray worker: the in-memory data path vs Ray Data.

    python bench/memory.py                                   # 1,000 and 20,000 images, both paths
    python bench/memory.py --sizes 1000 5000 --paths ray_data

Generates pets-sized photos-like JPEGs (224 px, tens of kB each, 4 classes of textures) into an
own_images archive in fastai's class-folder layout, prepares and validates it once per size, then
runs the real `coursepipe train own_images` once per data path in its own process: the driver's
peak RSS is that process's, the worker's is rank 0's (models/own_images/train.json). The model is
deliberately cheap (ResNet-18 from scratch at `--model-side` px, 1 epoch, bs 64): what is measured
is what the data path holds, not the network. Ratios size_max / size_min are printed per path
(issue 12's target on the Ray Data path: 20k / 1k <= 1.3). Work files live under --work.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("stripes", "spots", "waves", "noise")
# the train process reports its own peak RSS (KiB on Linux) on its last line
WRAPPER = ("import resource, runpy, sys\n"
           "sys.argv = ['coursepipe'] + sys.argv[1:]\n"
           "try:\n    runpy.run_module('coursepipe.cli', run_name='__main__')\n"
           "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
           # VmHWM, not getrusage's ru_maxrss: a child's ru_maxrss starts at its parent's RSS at
           # fork (Linux keeps it across exec), so it counted this bench's own memory, the
           # generated images, as the driver's (the 2.73x of docs/RESULTS.md, issue 12)
           "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
           "print('DRIVER_MAX_RSS_KB', hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
           "sys.exit(code)\n")


def photo(label: int, rng: np.random.Generator, side: int) -> bytes:
    """A 224-px JPEG of one texture class, with photo-like detail (so it is tens of kB)."""
    from PIL import Image

    yy, xx = np.mgrid[0:side, 0:side] / side
    f = rng.uniform(4, 12)
    base = [np.sin(xx * f * 6.28), (np.sin(xx * f * 6) * np.sin(yy * f * 6)),
            np.sin((xx + 0.3 * np.sin(yy * 9)) * f * 6.28), rng.normal(0, 1, (side, side))][label]
    colour = rng.uniform(40, 215, 3)
    img = colour + 40 * base[..., None] + rng.normal(0, 18, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def archive(n: int, side: int, out: Path) -> Path:
    from coursepipe.data.archive import deterministic_tgz

    if out.is_file():
        return out
    rng = np.random.default_rng(n)
    files = {f"textures/{CLASSES[i % 4]}/{i}.jpg": photo(i % 4, rng, side) for i in range(n)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(deterministic_tgz(files))
    return out


def params(src: Path, n: int, model_side: int, threads: int) -> dict:
    from coursepipe.io import file_digest

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    sec = raw["recipes"]["own_images"]
    raw["recipes"] = {"own_images": sec}
    sec["sources"]["bench"] = {"path": str(src), "sha256": file_digest(src)}
    sec["source"] = "bench"
    sec["validate"].update({"min_rows": 10})
    sec["model"].update({"arch": "resnet18", "weights": "none", "normalize": "imagenet", "lin_ftrs": [16],
                         "size": [model_side, model_side],
                         "augment": {k: (False if k == "flip" else 1.0 if k == "max_zoom" else 0.0)
                                     for k in sec["model"]["augment"]}})
    sec["train"].update({"epochs": 1, "freeze_epochs": 0, "bs": 64, "num_workers": 1, "threads": threads,
                         "bn": "train"})
    return raw


def cli(root: Path, *args: str, wrapper: bool = False) -> str:
    cmd = [sys.executable, *(["-c", WRAPPER] if wrapper else ["-m", "coursepipe.cli"]),
           "--root", str(root), *args]
    proc = subprocess.run(cmd, cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled", DVC_NO_ANALYTICS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    ap.add_argument("--paths", nargs="+", default=["memory", "ray_data"], choices=["memory", "ray_data"])
    ap.add_argument("--side", type=int, default=224, help="generated JPEG side, px")
    ap.add_argument("--model-side", type=int, default=64, help="model input side, px")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/coursepipe-bench-memory")
    args = ap.parse_args(argv)
    work = Path(args.work)
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    for n in args.sizes:
        src = archive(n, args.side, work / "archives" / f"textures-{n}-{args.side}.tgz")
        root = work / f"root-{n}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        (root / "params.yaml").write_text(yaml.safe_dump(params(src, n, args.model_side, args.threads),
                                                          sort_keys=False))
        shutil.copytree(REPO / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))
        for step in (("fetch", "own_images", "--no-dvc"), ("prepare", "own_images"),
                     ("gx-init", "own_images"), ("validate", "own_images")):
            cli(root, *step)
        table = root / "prepared" / "own_images" / "table.parquet"
        print(f"{n} images: archive {src.stat().st_size / 1e6:.0f} MB, prepared table "
              f"{table.stat().st_size / 1e6:.0f} MB", flush=True)
        for path in args.paths:
            raw = yaml.safe_load((root / "params.yaml").read_text())
            raw["recipes"]["own_images"]["train"]["data_path"] = path
            (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
            t0 = time.perf_counter()
            out = cli(root, "train", "own_images", wrapper=True)
            wall = time.perf_counter() - t0
            driver = int(out.rsplit("DRIVER_MAX_RSS_KB", 1)[1].split()[0]) / 1024
            summary = json.loads((root / "models" / "own_images" / "train.json").read_text())
            rows.append({"images": n, "path": path, "driver_mb": driver,
                         "worker_mb": summary["worker_max_rss_mb"], "train_s": summary["train_seconds"],
                         "wall_s": wall})
            print(f"  {path:9s} driver {driver:7.0f} MB  worker {summary['worker_max_rss_mb']:7.0f} MB  "
                  f"training {summary['train_seconds']:6.1f} s  wall {wall:6.1f} s", flush=True)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    lo, hi = min(args.sizes), max(args.sizes)
    for path in args.paths:
        a = next(r for r in rows if r["path"] == path and r["images"] == lo)
        b = next(r for r in rows if r["path"] == path and r["images"] == hi)
        print(f"{path:9s} {hi}/{lo} images: driver {b['driver_mb'] / a['driver_mb']:.2f}x, "
              f"worker {b['worker_mb'] / a['worker_mb']:.2f}x")


if __name__ == "__main__":
    main()
