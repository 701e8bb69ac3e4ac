"""The pipeline's fine-tune vs a linear probe on the same frozen backbone, same split, one run.

    python bench/linear_probe.py --root R pets             # after `coursepipe --root R pipeline pets`
    python bench/linear_probe.py --root R pets --size 224  # the probe at another input size

Reads R's prepared table (its is_valid split) and R/metrics/<recipe>.json (the fine-tuned
accuracy), builds the recipe's pretrained body with its declared weights, and fits a
logistic-regression probe (L2, LBFGS) on the pooled features of the training images. Prints
both accuracies and their ratio. An image recipe only; nothing here trains the backbone.
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
    metrics = paths.metrics(recipe.name)
    tuned = json.loads(metrics.read_text()).get("accuracy") if metrics.is_file() else None
    print(f"{recipe.name}: {len(xtr)} train / {len(xte)} valid images, {m.arch} at {m.size[0]} px")
    print(f"linear probe on frozen features: accuracy {acc:.4f} ({seconds:.1f} s)")
    if tuned is None:
        print(f"fine-tuned: no {metrics} (run the pipeline first)")
    else:
        print(f"fine-tuned (metrics/{recipe.name}.json): accuracy {tuned:.4f}")
        print(f"ratio fine-tuned / probe = {tuned / acc:.3f}")


if __name__ == "__main__":
    main()
