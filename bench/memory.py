"""Peak memory of the train stage's driver and Ray worker: the in-memory data path vs Ray Data.

    python bench/memory.py                                   # 1,000 and 20,000 images, both paths
    python bench/memory.py --sizes 1000 5000 --paths ray_data
    python bench/memory.py --text ../shared/data/imdb_full.tgz   # 1,000 and 20,000 IMDB reviews
    python bench/memory.py --text ../shared/data/imdb_full.tgz --lm   # ... as a language model

`--text`: the same for the text classifier (`imdb`) on that many of a real aclImdb archive's
training reviews (`prepare.max_train`; 500 test reviews score), from a tiny language-model chain
trained once on the synthetic default (imdb_pretrain -> imdb_lm, 1 epoch each): a tiny AWD-LSTM,
1 epoch, bs 64, gradients through the last 72 tokens. Only the classifier's train stage is timed.
`--lm`: the language model (`imdb_pretrain`) on that many of the archive's corpus texts
(`prepare.max_texts`; 10% of them score), the same tiny AWD-LSTM, 1 epoch, bs 64, bptt 72.

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


TEXT_CHAIN = ("imdb_pretrain", "imdb_lm", "imdb")


def text_params(src: Path, threads: int) -> dict:
    """The imdb chain with a tiny AWD-LSTM; the classifier reads `src` (its max_train: per size)."""
    from coursepipe.io import file_digest

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["recipes"] = {r: raw["recipes"][r] for r in TEXT_CHAIN}
    for sec in raw["recipes"].values():
        sec["model"].update({"emb_sz": 16, "n_hid": 32, "n_layers": 1, "seq_len": 72, "max_vocab": 2000})
        sec["train"].update({"epochs": 1, "bs": 64, "valid_bs": 64, "num_workers": 1, "threads": threads})
    clas = raw["recipes"]["imdb"]
    clas["sources"]["bench"] = {"path": str(src), "sha256": file_digest(src)}
    clas["source"] = "bench"
    clas["prepare"].update({"max_valid": 500})
    clas["model"].update({"max_len": 72, "unfreeze": [[1, 0.01]]})
    return raw


def lm_params(src: Path, threads: int) -> dict:
    """imdb_pretrain alone with text_params' tiny AWD-LSTM, reading its corpus from `src`."""
    raw = text_params(src, threads)
    lm = raw["recipes"]["imdb_pretrain"]
    lm["sources"]["bench"], lm["source"] = raw["recipes"]["imdb"]["sources"]["bench"], "bench"
    raw["recipes"] = {"imdb_pretrain": lm}
    return raw


def set_params(root: Path, recipe: str, section: str, **values) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["recipes"][recipe][section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def cli(root: Path, *args: str, wrapper: bool = False) -> str:
    cmd = [sys.executable, *(["-c", WRAPPER] if wrapper else ["-m", "coursepipe.cli"]),
           "--root", str(root), *args]
    proc = subprocess.run(cmd, cwd=root, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=dict(os.environ, RAY_AUTH_MODE="disabled", DVC_NO_ANALYTICS="1"))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}")
    return proc.stdout


def measure(root: Path, recipe: str, n: int, path: str) -> dict:
    """One `coursepipe train` on data path `path`: the driver's and rank 0's peak RSS."""
    set_params(root, recipe, "train", data_path=path)
    t0 = time.perf_counter()
    out = cli(root, "train", recipe, wrapper=True)
    wall = time.perf_counter() - t0
    driver = int(out.rsplit("DRIVER_MAX_RSS_KB", 1)[1].split()[0]) / 1024
    summary = json.loads((root / "models" / recipe / "train.json").read_text())
    print(f"  {path:9s} driver {driver:7.0f} MB  worker {summary['worker_max_rss_mb']:7.0f} MB  "
          f"training {summary['train_seconds']:6.1f} s  wall {wall:6.1f} s", flush=True)
    parts = summary.get("worker_rss_now_mb", {})  # anon / file / shmem (object store pages)
    if parts:
        print("            worker at the end: " + ", ".join(f"{k} {v:.0f} MB" for k, v in parts.items()),
              flush=True)
    return {"rows": n, "path": path, "driver_mb": driver, "worker_mb": summary["worker_max_rss_mb"],
            "train_s": summary["train_seconds"], "wall_s": wall}


def new_root(root: Path, raw: dict) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(REPO / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    return root


def image_rows(args, work: Path) -> list[dict]:
    rows = []
    for n in args.sizes:
        src = archive(n, args.side, work / "archives" / f"textures-{n}-{args.side}.tgz")
        root = new_root(work / f"root-{n}", params(src, n, args.model_side, args.threads))
        for step in (("fetch", "own_images", "--no-dvc"), ("prepare", "own_images"),
                     ("gx-init", "own_images"), ("validate", "own_images")):
            cli(root, *step)
        table = root / "prepared" / "own_images" / "table.parquet"
        print(f"{n} images: archive {src.stat().st_size / 1e6:.0f} MB, prepared table "
              f"{table.stat().st_size / 1e6:.0f} MB", flush=True)
        rows += [measure(root, "own_images", n, path) for path in args.paths]
    return rows


def per_size(args, root: Path, recipe: str, key: str, unit: str) -> list[dict]:
    """For each size: `recipe` prepared from that many rows (`prepare.<key>`), validated, then
    trained once per data path."""
    rows = []
    for n in args.sizes:
        set_params(root, recipe, "prepare", **{key: n})
        cli(root, "prepare", recipe)
        cli(root, "validate", recipe)
        table = root / "prepared" / recipe / "table.parquet"
        print(f"{n} {unit}: prepared table {table.stat().st_size / 1e6:.1f} MB", flush=True)
        rows += [measure(root, recipe, n, path) for path in args.paths]
    return rows


def lm_rows(args, work: Path) -> list[dict]:
    root = new_root(work / "root-lm", lm_params(Path(args.text).resolve(), args.threads))
    cli(root, "fetch", "imdb_pretrain", "--no-dvc")
    cli(root, "gx-init", "imdb_pretrain")
    return per_size(args, root, "imdb_pretrain", "max_texts", "texts")


def text_rows(args, work: Path) -> list[dict]:
    root = new_root(work / "root-text", text_params(Path(args.text).resolve(), args.threads))
    for recipe in TEXT_CHAIN:  # the language models once; the classifier's table per size below
        cli(root, "fetch", recipe, "--no-dvc")
        cli(root, "gx-init", recipe)
        if recipe != "imdb":
            cli(root, "prepare", recipe)
            cli(root, "validate", recipe)
            cli(root, "train", recipe)
    return per_size(args, root, "imdb", "max_train", "reviews")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 20000])
    ap.add_argument("--paths", nargs="+", default=["memory", "ray_data"], choices=["memory", "ray_data"])
    ap.add_argument("--side", type=int, default=224, help="generated JPEG side, px")
    ap.add_argument("--model-side", type=int, default=64, help="model input side, px")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", help="an aclImdb archive: measure the text classifier on its reviews")
    ap.add_argument("--lm", action="store_true", help="with --text: the language model instead")
    ap.add_argument("--work", default="/tmp/coursepipe-bench-memory")
    args = ap.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    rows = (lm_rows if args.lm else text_rows if args.text else image_rows)(args, Path(args.work))
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    lo, hi = min(args.sizes), max(args.sizes)
    unit = "texts" if args.lm else "reviews" if args.text else "images"
    for path in args.paths:
        a = next(r for r in rows if r["path"] == path and r["rows"] == lo)
        b = next(r for r in rows if r["path"] == path and r["rows"] == hi)
        print(f"{path:9s} {hi}/{lo} {unit}: driver {b['driver_mb'] / a['driver_mb']:.2f}x, "
              f"worker {b['worker_mb'] / a['worker_mb']:.2f}x")


if __name__ == "__main__":
    main()
