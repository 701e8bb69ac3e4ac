"""Training throughput (images/s) of the Ray Data path vs a bare PyTorch DataLoader loop.

    python bench/throughput.py                       # 2,000 generated 224-px JPEGs, 64-px model, 3 epochs
    python bench/throughput.py --images 4000 --epochs 2 --threads 1
    python bench/throughput.py --mnist /work/shared/data/mnist_tiny_png.tgz   # also mnist time-to-accuracy

One command, same data, model, batch size, optimiser and torch threads for every row:
1. bare: a plain loop over a torch DataLoader whose Dataset decodes each JPEG from the prepared
   table's bytes (the export's own decode, so the pixels are identical), one loader worker process
   (decoding off the training thread, as Ray Data's tasks do);
2. ray_data: `ray_train.fit` with `train.data_path: ray_data` (1 Ray Train worker);
3. memory: `ray_train.fit` with the table inside the train config (the old path), for reference.
images/s = training images x epochs / seconds of the epoch loops (validation included in all three).
With --mnist, the real MNIST recipe is trained on both Ray paths and the seconds to its final
accuracy are printed (issue 12: time-to-accuracy unchanged within noise).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from memory import REPO, archive, cli, params  # noqa: E402  (the generated data of bench/memory.py)


class Rows(torch.utils.data.Dataset):
    """(uint8 image, label) per prepared row, decoded on access."""

    def __init__(self, df, processor):
        self.images, self.processor = df["image"].tolist(), processor
        index = {c: i for i, c in enumerate(processor["classes"])}
        self.labels = df["label"].map(index).tolist()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from coursepipe.vision.images import decode_many
        p = self.processor
        x = decode_many([self.images[i]], p["mode"], tuple(p["size"]), p["resize"])[0]
        return torch.from_numpy(x), self.labels[i]


def bare(recipe, m, t, frame, epochs: int) -> tuple[float, float]:
    """(images/s, final valid accuracy) of a plain loop with a DataLoader (1 decode process)."""
    from coursepipe.learn.program import optimizer

    torch.set_num_threads(t.threads or t.cpus_per_worker)
    torch.manual_seed(t.seed)
    kind = recipe.kind
    train_df, valid_df = kind.usable(frame[~frame["is_valid"]]), kind.usable(frame[frame["is_valid"]])
    proc = kind.fit_processor(recipe, train_df, m)
    model = kind.build_model(recipe, proc, m)
    opt, loss_func = optimizer(kind.splitter(m, model), t), kind.loss_func(m)
    loaders = [torch.utils.data.DataLoader(Rows(df, proc), batch_size=bs, shuffle=shuffle, drop_last=shuffle,
                                           num_workers=1, persistent_workers=True)
               for df, bs, shuffle in ((train_df, t.bs, True), (valid_df, t.valid_bs, False))]
    seen, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in loaders[0]:
            loss = loss_func(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in loaders[1]:
                correct += int((model(x).argmax(1) == y).sum())
    seconds = time.perf_counter() - t0
    return seen / seconds, correct / len(valid_df)


def ray_run(recipe, cfg, paths, path: str, storage: Path) -> tuple[float, dict]:
    """(images/s, the run's last history row) of the real train stage's fit on one data path."""
    from coursepipe.config import evolve
    from coursepipe.distributed import ray_train
    from coursepipe.stages import train

    cfg = dataclasses.replace(cfg, train=evolve(cfg.train, data_path=path))
    frame, stream = train.load_frame(cfg, recipe, paths)
    shutil.rmtree(storage, ignore_errors=True)
    fit = ray_train.fit(recipe, cfg.model, cfg.train, frame, storage=str(storage), run_name=f"bench-{path}",
                        verbose=False, stream=stream)
    n_train = len(recipe.kind.usable(frame[~frame["is_valid"]]))
    steps = (n_train // cfg.train.bs) * cfg.train.bs  # drop_last, as the bare loop
    return steps * len(fit.history) / fit.train_seconds, fit.history[-1] | {"train_s": fit.train_seconds}


def main(argv: list[str] | None = None) -> None:
    from coursepipe import recipes
    from coursepipe.distributed.ray_train import init_ray
    from coursepipe.paths import Paths
    from coursepipe.stages import prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model-side", type=int, default=64)
    ap.add_argument("--mnist", help="the real MNIST archive (mnist_tiny_png.tgz): time-to-accuracy too")
    ap.add_argument("--work", default="/tmp/coursepipe-bench-throughput")
    args = ap.parse_args(argv)
    work = Path(args.work)
    src = archive(args.images, 224, work / "archives" / f"textures-{args.images}-224.tgz")
    root = work / "root"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    raw = params(src, args.images, args.model_side, args.threads)
    raw["recipes"]["own_images"]["train"]["epochs"] = args.epochs
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(REPO / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    for step in (("fetch", "own_images", "--no-dvc"), ("prepare", "own_images"), ("gx-init", "own_images"),
                 ("validate", "own_images")):
        cli(root, *step)
    paths = Paths(root)
    recipe = recipes.get("own_images")
    cfg = recipes.load_params(paths.params).recipe("own_images")
    print(f"load average at start: {os.getloadavg()[0]:.1f}; {args.images} images, model at "
          f"{args.model_side} px, bs {cfg.train.bs}, {args.epochs} epochs, {args.threads} torch thread(s)", flush=True)
    rate_bare, acc_bare = bare(recipe, cfg.model, cfg.train, prepare.load(paths, "own_images"), args.epochs)
    print(f"bare DataLoader loop: {rate_bare:7.1f} images/s (valid accuracy {acc_bare:.3f})", flush=True)
    init_ray()
    rates = {}
    for path in ("ray_data", "memory"):
        rates[path], last = ray_run(recipe, cfg, paths, path, root / ".runs")
        print(f"ray_train.fit, {path:8s}: {rates[path]:7.1f} images/s (valid accuracy {last['accuracy']:.3f})",
              flush=True)
    print(f"ratio ray_data / bare = {rates['ray_data'] / rate_bare:.2f}x (goal >= 0.9); "
          f"memory / bare = {rates['memory'] / rate_bare:.2f}x")
    if args.mnist:
        mroot = work / "mnist"
        shutil.rmtree(mroot, ignore_errors=True)
        mroot.mkdir(parents=True)
        mraw = yaml.safe_load((REPO / "params.yaml").read_text())
        mnist = mraw["recipes"]["mnist"]
        mraw["recipes"] = {"mnist": mnist}
        mnist["sources"]["bench"] = {"path": args.mnist,
                                     "sha256": hashlib.sha256(Path(args.mnist).read_bytes()).hexdigest()}
        mnist["source"] = "bench"
        mnist["train"]["threads"] = args.threads
        (mroot / "params.yaml").write_text(yaml.safe_dump(mraw, sort_keys=False))
        shutil.copytree(REPO / "gx", mroot / "gx", ignore=shutil.ignore_patterns("uncommitted"))
        for step in (("fetch", "mnist", "--no-dvc"), ("prepare", "mnist"), ("validate", "mnist")):
            cli(mroot, *step)
        mpaths = Paths(mroot)
        mcfg = recipes.load_params(mpaths.params).recipe("mnist")
        for path in ("memory", "ray_data"):
            _, last = ray_run(recipes.get("mnist"), mcfg, mpaths, path, mroot / ".runs")
            print(f"mnist, {path:8s}: accuracy {last['accuracy']:.4f} after {last['epoch'] + 1} epochs "
                  f"in {last['train_s']:.1f} s of training", flush=True)


if __name__ == "__main__":
    main()
