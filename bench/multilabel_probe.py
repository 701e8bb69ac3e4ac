"""A multi-label recipe's fine-tune vs a linear probe on the same frozen backbone, same split, one run.

    python bench/multilabel_probe.py --root R planet --seeds 42 1 2   # fine-tune 3 seeds here, then the probe
    python bench/multilabel_probe.py --root R planet                  # probe vs R/metrics/planet.json

Reads R's prepared table (its is_valid split; run `coursepipe --root R prepare/validate` first),
builds the recipe's pretrained body with its declared weights, and fits scikit-learn's one-vs-rest
logistic regression (L2, LBFGS, one binary classifier per tag) on the standardised pooled features
of the training images. Both are scored with the kind's own metric (samples-averaged F-beta,
coursepipe/kinds/multi_label.py) at model.threshold, and at the best threshold of the evaluate
section's sweep on the validation rows (an optimistic number for both, reported for both). With
`--seeds`, it first trains the recipe with R's params once per train seed through
`coursepipe.learn.program.train` (the function every Ray worker runs, here in-process: the numbers,
not the cluster, are measured) and prints each seed's F-beta; else it reads R/metrics/<recipe>.json.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def features(net, x: torch.Tensor, bs: int = 64) -> np.ndarray:
    """Global-average-pooled body features (N, C) of uint8 images, as the probe's inputs."""
    with torch.no_grad():
        return torch.cat([net.backbone(net.stem(x[i:i + bs])).mean((2, 3))
                          for i in range(0, len(x), bs)]).numpy()


def probe_probs(ftr: np.ndarray, ytr: np.ndarray, fte: np.ndarray, c: float) -> np.ndarray:
    """Per-tag probabilities on the validation features from one-vs-rest logistic regressions."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegression(C=c, max_iter=2000)))
    clf.fit(ftr, ytr.astype(int))
    return clf.predict_proba(fte)


def fbeta_of(probs: np.ndarray, y: torch.Tensor, threshold: float, beta: float) -> float:
    from coursepipe.kinds.multi_label import fbeta_samples

    logits = torch.logit(torch.from_numpy(probs).float().clamp(1e-7, 1 - 1e-7))
    s, n = fbeta_samples(logits, y, threshold, beta)
    return float(s / n)


def best_of(probs: np.ndarray, y: torch.Tensor, grid: tuple[float, float, float], beta: float) -> tuple[float, float]:
    """(best F-beta, its threshold) over the evaluate section's sweep."""
    from coursepipe.kinds.multi_label import threshold_sweep

    sweep = threshold_sweep(torch.from_numpy(probs).float(), y, *grid, beta)
    row = sweep.loc[sweep["fbeta"].idxmax()]
    return float(row["fbeta"]), float(row["threshold"])


def fine_tune(recipe, cfg, frame, seed: int, valid_x, valid_y) -> tuple[float, float, tuple[float, float]]:
    """(F-beta at model.threshold after the last epoch, training seconds, (best F-beta, threshold))
    of one in-process run with train.seed = seed."""
    from coursepipe.config import evolve
    from coursepipe.learn import program
    from coursepipe.learn.infer import predict_logits

    out = program.train(recipe, cfg.model, evolve(cfg.train, seed=seed), frame, program.Hooks(show=False))
    print(f"  seed {seed}, valid F-beta per epoch: " + " ".join(f"{h['fbeta']:.3f}" for h in out.history))
    model = out.parts.model
    model = getattr(model, "module", model).eval()    # DDP-wrapped or not
    probs = torch.sigmoid(predict_logits(model, (valid_x,), 64)).numpy()
    best = best_of(probs, valid_y, cfg.evaluate.thresholds, cfg.model.beta)
    return out.history[-1]["fbeta"], out.train_seconds, best


def main(argv: list[str] | None = None) -> None:
    from coursepipe import recipes
    from coursepipe.models import transfer
    from coursepipe.paths import Paths
    from coursepipe.stages import prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--root", default=".")
    ap.add_argument("--C", type=float, default=0.1, help="the probe's inverse L2 strength")
    ap.add_argument("--seeds", type=int, nargs="*", default=[],
                    help="train the recipe in-process with these train seeds first")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    paths = Paths(args.root)
    cfg, recipe = recipes.load_params(paths.params).recipe(args.recipe), recipes.get(args.recipe)
    m, t, beta = cfg.model, cfg.model.threshold, cfg.model.beta
    frame = prepare.load(paths, recipe.name)
    train_df, valid_df = frame[~frame["is_valid"]], frame[frame["is_valid"]]
    proc = recipe.kind.fit_processor(recipe, train_df, m)
    net = recipe.kind.build_model(recipe, proc, m).eval()
    weights = transfer.resolve(m.weights, m.weights_cache, m.weights_sha256, m.weights_timeout_s, m.arch)
    transfer.load_backbone(net, weights, m.weights)
    t0 = time.perf_counter()
    xtr, ytr = recipe.kind.tensors(recipe, proc, train_df)
    xte, yte = recipe.kind.tensors(recipe, proc, valid_df)
    probs = probe_probs(features(net, xtr), ytr.numpy(), features(net, xte), args.C)
    probe, probe_best = fbeta_of(probs, yte, t, beta), best_of(probs, yte, cfg.evaluate.thresholds, beta)
    seconds = time.perf_counter() - t0
    print(f"{recipe.name}: {len(xtr)} train / {len(xte)} valid images, {len(proc['classes'])} tags "
          f"{proc['classes']}, {m.arch} at {m.size[0]} px; F{beta:g} (samples) at threshold {t:g}")
    if args.seeds:
        runs = [fine_tune(recipe, cfg, frame, seed, xte, yte) for seed in args.seeds]
        for seed, (f, secs, (fb, tb)) in zip(args.seeds, runs):
            print(f"fine-tuned, train seed {seed}: F{beta:g} {f:.4f} (best {fb:.4f} at {tb:g}; "
                  f"{secs:.0f} s of training)")
        tuned = sum(f for f, _, _ in runs) / len(runs)
        print(f"fine-tuned, mean of {len(runs)} seeds: F{beta:g} {tuned:.4f} "
              f"(min {min(f for f, _, _ in runs):.4f}, max {max(f for f, _, _ in runs):.4f}; "
              f"mean best {sum(b[0] for _, _, b in runs) / len(runs):.4f})")
    else:
        metrics = paths.metrics(recipe.name)
        tuned = json.loads(metrics.read_text()).get("fbeta") if metrics.is_file() else None
    print(f"linear probe (one-vs-rest logistic regression, C {args.C:g}) on frozen features: "
          f"F{beta:g} {probe:.4f} (best {probe_best[0]:.4f} at {probe_best[1]:g}; {seconds:.1f} s)")
    if tuned is None:
        print(f"fine-tuned: no {metrics} (run the pipeline first)")
    else:
        if not args.seeds:
            print(f"fine-tuned (metrics/{recipe.name}.json): F{beta:g} {tuned:.4f}")
        print(f"fine-tuned {'above' if tuned > probe else 'NOT above'} the probe: "
              f"difference {tuned - probe:+.4f}, ratio {tuned / probe:.3f}")


if __name__ == "__main__":
    main()
