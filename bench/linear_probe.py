"""The pipeline's fine-tune vs a linear probe on the same frozen backbone, same split, one run.

    python bench/linear_probe.py --root R pets                     # probe vs R/metrics/pets.json
    python bench/linear_probe.py --root R pets --size 224          # the probe at another input size
    python bench/linear_probe.py --root R pets --seeds 42 1 2      # fine-tune 3 seeds here, then the probe

Reads R's prepared table (its is_valid split; run `coursepipe --root R prepare/validate` first),
builds the recipe's pretrained body with its declared weights, and fits a logistic-regression
probe (L2, LBFGS) on the pooled features of the training images. With `--seeds`, it first trains
the recipe with R's params once per train seed through `coursepipe.learn.program.train` (the
function every Ray worker runs, here in-process: the numbers, not the cluster, are measured) and
prints each seed's validation accuracy; else it reads the accuracy of R/metrics/<recipe>.json.
Prints both accuracies and their ratio. An image recipe only.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def features(net, x: torch.Tensor, bs: int = 64) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net.backbone(net.stem(x[i:i + bs])).mean((2, 3)) for i in range(0, len(x), bs)])


def probe(ftr, ytr, fte, yte, n_classes: int, l2: float) -> float:
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    w = torch.zeros(ftr.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ftr @ w + b, ytr) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return float(((fte @ w + b).argmax(1) == yte).float().mean())


def fine_tune(recipe, cfg, frame, seed: int) -> tuple[float, float]:
    """(validation accuracy after the last epoch, training seconds) of one in-process run of the
    recipe's model and train sections with train.seed = seed."""
    from coursepipe.config import evolve
    from coursepipe.learn import program

    out = program.train(recipe, cfg.model, evolve(cfg.train, seed=seed), frame, program.Hooks(show=False))
    return out.history[-1]["accuracy"], out.train_seconds


def main(argv: list[str] | None = None) -> None:
    from coursepipe import recipes
    from coursepipe.config import evolve
    from coursepipe.models import transfer
    from coursepipe.paths import Paths
    from coursepipe.stages import prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--root", default=".")
    ap.add_argument("--size", type=int, help="probe input side, px (default: the recipe's model.size)")
    ap.add_argument("--l2", type=float, default=1e-2)
    ap.add_argument("--seeds", type=int, nargs="*", default=[],
                    help="train the recipe in-process with these train seeds first")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    paths = Paths(args.root)
    cfg, recipe = recipes.load_params(paths.params).recipe(args.recipe), recipes.get(args.recipe)
    m = cfg.model if args.size is None else evolve(cfg.model, size=(args.size, args.size))
    frame = prepare.load(paths, recipe.name)
    train_df, valid_df = frame[~frame["is_valid"]], frame[frame["is_valid"]]
    proc = recipe.kind.fit_processor(recipe, train_df, m)
    net = recipe.kind.build_model(recipe, proc, m).eval()
    weights = transfer.resolve(m.weights, m.weights_cache, m.weights_sha256, m.weights_timeout_s, m.arch)
    transfer.load_backbone(net, weights, m.weights)
    t0 = time.perf_counter()
    xtr, ytr = recipe.kind.tensors(recipe, proc, train_df)
    xte, yte = recipe.kind.tensors(recipe, proc, valid_df)
    acc = probe(features(net, xtr), ytr, features(net, xte), yte, len(proc["classes"]), args.l2)
    seconds = time.perf_counter() - t0
    print(f"{recipe.name}: {len(xtr)} train / {len(xte)} valid images, {m.arch} at {m.size[0]} px")
    if args.seeds:
        runs = [fine_tune(recipe, cfg, frame, seed) for seed in args.seeds]
        for seed, (a, secs) in zip(args.seeds, runs):
            print(f"fine-tuned, train seed {seed}: accuracy {a:.4f} ({secs:.0f} s of training)")
        tuned = sum(a for a, _ in runs) / len(runs)
        print(f"fine-tuned, mean of {len(runs)} seeds: accuracy {tuned:.4f} "
              f"(min {min(a for a, _ in runs):.4f}, max {max(a for a, _ in runs):.4f})")
    else:
        metrics = paths.metrics(recipe.name)
        tuned = json.loads(metrics.read_text()).get("accuracy") if metrics.is_file() else None
    print(f"linear probe on frozen features: accuracy {acc:.4f} ({seconds:.1f} s)")
    if tuned is None:
        print(f"fine-tuned: no {metrics} (run the pipeline first)")
    else:
        if not args.seeds:
            print(f"fine-tuned (metrics/{recipe.name}.json): accuracy {tuned:.4f}")
        print(f"ratio fine-tuned / probe = {tuned / acc:.3f}")


if __name__ == "__main__":
    main()
