"""head_pose's point model over seeds and heads, against the predict-the-mean baseline, one run each.

    python bench/head_pose.py --root R                               # R's params, seed 42
    python bench/head_pose.py --root R --seeds 42 1 2                # 3 seeds: mean valid MSE
    python bench/head_pose.py --root R --seeds 42 1 2 --head pool    # fastai's pooled head instead

Reads R's prepared table (run `coursepipe --root R prepare head_pose` first) and trains the
recipe with R's params through `coursepipe.learn.program.train` (the function every Ray worker
runs, here in-process: the numbers, not the cluster, are measured). `--head`, `--size W H`,
`--epochs`, `--freeze-epochs`, `--bs`, `--lr` override R's params for the comparison. Prints each seed's valid MSE
(units of [-1, 1]) and seconds, their mean, and the MSE of predicting the training points' mean.
"""
from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> None:
    import numpy as np

    from coursepipe import recipes
    from coursepipe.config import evolve
    from coursepipe.kinds.points import units
    from coursepipe.learn import program
    from coursepipe.paths import Paths
    from coursepipe.stages import prepare

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--recipe", default="head_pose")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--head", choices=("softargmax", "pool"))
    ap.add_argument("--size", type=int, nargs=2)
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--freeze-epochs", type=int)
    ap.add_argument("--bs", type=int)
    ap.add_argument("--lr", type=float)
    args = ap.parse_args(argv)

    paths = Paths(args.root)
    recipe = recipes.get(args.recipe)
    cfg = recipes.load_params(paths.params).recipe(args.recipe)
    frame = prepare.load(paths, args.recipe)
    m = evolve(cfg.model, **{k: v for k, v in (("head", args.head), ("size", tuple(args.size or ()) or None))
                             if v is not None})
    t = evolve(cfg.train, **{k: v for k, v in (("epochs", args.epochs), ("freeze_epochs", args.freeze_epochs),
                                                         ("bs", args.bs), ("lr", args.lr))
                             if v is not None})
    train, valid = frame[~frame["is_valid"]], frame[frame["is_valid"]]
    baseline = float(((units(train).mean(0) - units(valid)) ** 2).mean())
    print(f"{args.recipe}: {len(train)} train / {len(valid)} valid frames, head {m.head}, size {list(m.size)}, "
          f"{t.freeze_epochs} frozen + {t.epochs} epochs, bs {t.bs}")
    scores = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        out = program.train(recipe, m, evolve(t, seed=seed), frame, program.Hooks(show=False))
        scores.append(out.history[-1]["mse"])
        print(f"seed {seed}: valid mse {scores[-1]:.5f}  ({time.perf_counter() - t0:.1f} s, "
              f"epoch loop {out.train_seconds:.1f} s)", flush=True)
    print(f"mean valid mse over {len(scores)} seed(s): {np.mean(scores):.5f} (sd {np.std(scores):.5f}); "
          f"predict-the-training-mean baseline: {baseline:.5f}")


if __name__ == "__main__":
    main()
