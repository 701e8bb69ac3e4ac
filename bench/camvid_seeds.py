"""camvid's accuracy target: acc_camvid over train seeds on a real archive, pretrained vs from scratch.

    python bench/camvid_seeds.py                                   # camvid_tiny.tgz, 240x180, seeds 0 1 2 + scratch
    python bench/camvid_seeds.py --seeds 0 --no-scratch            # one seed
    python bench/camvid_seeds.py --device cuda --threads 8         # the same runs on a GPU
    python bench/camvid_seeds.py --set train.epochs=30 --set model.blur=true

Reads params.yaml's camvid model and train sections (changed by --size and --set), prepares the
archive with the recipe and its kind (the split: the archive's own, else prepare's seeded random
valid_pct), then trains once per seed with `coursepipe.learn.program.train`, the function every
Ray worker runs, here in-process (the numbers are measured, not the cluster). Prints each run's
acc_camvid after its last epoch and its training seconds, the mean and the pretrained vs
from-scratch gap, then one JSON line with all of it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def frame_of(archive: Path, recipe, prepare):
    """The prepared table of `archive`, as the prepare stage makes it."""
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tf:
        tf.extractall(tmp, filter="data")
        return recipe.kind.prepare(recipe, recipe.normalise(recipe.read_raw(Path(tmp), prepare)), prepare)


def section_with(section, changes: dict):
    """`section` with dotted changes (`augment.flip=false` reaches into a nested section)."""
    import dataclasses

    from coursepipe.config import evolve

    nested: dict = {}
    flat = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = dataclasses.replace(getattr(section, head), **sub)
    return evolve(section, **flat)


def parse_sets(items: list[str]) -> tuple[dict, dict]:
    import yaml

    model, train = {}, {}
    for item in items:
        key, _, raw = item.partition("=")
        where, _, name = key.partition(".")
        if where not in ("model", "train") or not name:
            raise SystemExit(f"--set {item}: expected model.<key>=<value> or train.<key>=<value>")
        value = yaml.safe_load(raw)
        (model if where == "model" else train)[name] = tuple(value) if isinstance(value, list) else value
    return model, train


def run(recipe, m, t, frame, device: str) -> dict:
    from coursepipe.learn.program import Hooks, train

    def to_device(model):  # what Ray's prepare_model does for a worker (in place: the optimiser keeps its params)
        return model.to(device)

    t0 = time.perf_counter()
    out = train(recipe, m, t, frame, Hooks(device=device, show=False, wrap=to_device))
    seconds = time.perf_counter() - t0
    last = out.history[-1]
    return {"seed": t.seed, "weights": m.weights, "acc_camvid": round(last["acc_camvid"], 4),
            "best_acc_camvid": round(max(h["acc_camvid"] for h in out.history), 4),
            "valid_loss": round(last["valid_loss"], 4), "seconds": round(seconds, 1),
            "epochs": len(out.history)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", default=str(ROOT / "../shared/data/camvid_tiny.tgz"))
    ap.add_argument("--size", type=int, nargs=2, default=[240, 180], metavar=("W", "H"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--no-scratch", action="store_true", help="skip the from-scratch run (seed of the first)")
    ap.add_argument("--set", action="append", default=[], help="model.<key>=<yaml> or train.<key>=<yaml>")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: params' train.threads)")
    args = ap.parse_args(argv)

    os.environ.setdefault("TQDM_DISABLE", "1")
    from coursepipe.recipes import get, load_params

    recipe = get("camvid")
    cfg = load_params(ROOT / "params.yaml").recipe("camvid")
    model_set, train_set = parse_sets(args.set)
    m = section_with(cfg.model, {"size": tuple(args.size), **model_set})
    if args.threads:
        train_set["threads"] = args.threads
    t = section_with(cfg.train, train_set)
    t0 = time.perf_counter()
    frame = frame_of(Path(args.archive), recipe, cfg.prepare)
    bad = frame[frame["problem"] != ""]
    if len(bad):
        raise SystemExit(f"{args.archive}: {len(bad)} pairs have problems, e.g. {bad['problem'].iloc[0]}")
    print(f"{args.archive}: {len(frame)} pairs, {int(frame['is_valid'].sum())} valid, prepared in "
          f"{time.perf_counter() - t0:.1f} s; size {list(m.size)}; device {args.device}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"model: {m}\ntrain: {t}", flush=True)

    results = []
    for seed in args.seeds:
        results.append(run(recipe, m, section_with(t, {"seed": seed}), frame, args.device))
        print(json.dumps(results[-1]), flush=True)
    scratch = None
    if not args.no_scratch:
        scratch = run(recipe, section_with(m, {"weights": "none"}), section_with(t, {"seed": args.seeds[0]}),
                      frame, args.device)
        print(json.dumps({**scratch, "weights": "none (from scratch)"}), flush=True)
    accs = [r["acc_camvid"] for r in results]
    summary = {"archive": Path(args.archive).name, "size": list(m.size), "device": args.device,
               "mean_acc_camvid": round(statistics.mean(accs), 4),
               "min": min(accs), "max": max(accs), "seeds": args.seeds,
               "mean_seconds": round(statistics.mean(r["seconds"] for r in results), 1),
               "scratch_acc_camvid": scratch and scratch["acc_camvid"],
               "gap": scratch and round(statistics.mean(accs) - scratch["acc_camvid"], 4),
               "runs": results + ([scratch] if scratch else []), "sets": args.set}
    print(f"mean acc_camvid {summary['mean_acc_camvid']:.4f} over seeds {args.seeds} "
          f"(min {summary['min']:.4f}, max {summary['max']:.4f}), {summary['mean_seconds']} s a run"
          + (f"; from scratch {scratch['acc_camvid']:.4f} (gap {summary['gap']:+.4f})" if scratch else ""))
    print("RESULT " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
