"""Training overhead: the real Ray Train path vs a bare PyTorch loop, same data, model and schedule.

    .venv/bin/python bench/overhead.py [--rows N] [--epochs E] [--workers W] [--cpus C] [--threads T]

Both loops train recipe `adult` with the settings of params.yaml (bs 64, lr 1e-2, AdamW +
one-cycle) on the synthetic sample and run the same per-epoch validation pass. Steady state =
median epoch seconds after the first epoch; the Ray number is the `seconds` field rank 0 writes
into each history row. The bare loop runs in this process, without Learner or Ray, on the W * C
threads the fit reserves and, if different, on the worker's own thread count; the ratio is
taken against the faster of them. Prints a table, then `ratio ray/bare = X.XXx (goal <= 1.10)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.10  # ray/bare steady-state epoch time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=None, help="synthetic rows (default: params.yaml)")
    p.add_argument("--epochs", type=int, default=6, help="epochs per loop (>= 2 for a steady state)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--cpus", type=int, default=2, help="CPUs each Ray worker reserves")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (train.threads; default: params.yaml)")
    p.add_argument("--params", default=str(REPO / "params.yaml"))
    return p.parse_args(argv)


def bench_config(params: str, rows: int | None, epochs: int, workers: int, cpus: int,
                 threads: int | None):
    """The real adult config with the benchmark's overrides (rows, epochs, layout)."""
    from coursepipe import recipes

    cfg = recipes.load_params(params).recipe("adult")
    src = cfg.sources["synthetic"]
    sources = {**cfg.sources, "synthetic": dataclasses.replace(src, rows=rows or src.rows)}
    over = {"epochs": epochs, "num_workers": workers, "cpus_per_worker": cpus, "use_gpu": False}
    if threads is not None:
        if "threads" not in {f.name for f in dataclasses.fields(cfg.train)}:
            raise SystemExit("--threads needs a `threads` field in config.Train (train.threads)")
        over["threads"] = threads
    train = dataclasses.replace(cfg.train, **over)
    return dataclasses.replace(cfg, source="synthetic", sources=sources, train=train)


def prepared_frame(cfg, root: Path):
    """Fetch (generate) and prepare the synthetic sample under `root`, as the pipeline does."""
    from coursepipe.paths import Paths
    from coursepipe import recipes
    from coursepipe.sources import fetch
    from coursepipe.stages import prepare

    paths = Paths(root)
    fetch(cfg, paths.data, paths.root, synthesize=recipes.get("adult").synthesize)
    prepare.run(cfg, recipes.get("adult"), paths)
    return prepare.load(paths, cfg.name)


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- the bare loop

def bare_fit(cfg, frame, threads: int) -> list[dict]:
    """Plain PyTorch: same model, optimiser, one-cycle schedule and validation; no Learner, no Ray."""
    import torch

    from coursepipe import recipes
    from coursepipe.data.batches import shard_batches
    from coursepipe.learn.program import optimizer
    from coursepipe.learn.schedule import one_cycle_lr, one_cycle_mom

    t = cfg.train
    torch.set_num_threads(threads)
    torch.manual_seed(t.seed)
    recipe = recipes.get(cfg.name)
    kind = recipe.kind
    train_df, valid_df = frame[~frame["is_valid"]], frame[frame["is_valid"]]
    processor = kind.fit_processor(recipe, train_df, cfg.model)
    xc, xn, y = kind.tensors(recipe, processor, train_df)
    vc, vn, vy = kind.tensors(recipe, processor, valid_df)
    model = kind.build_model(recipe, processor, cfg.model)
    opt = optimizer(kind.splitter(cfg.model, model), t)
    loss_func = kind.loss_func(cfg.model)
    vbs = t.valid_bs
    sched_lr, sched_mom = one_cycle_lr(t.lr, t.pct_start, t.div, t.div_final), one_cycle_mom(t.moms, t.pct_start)
    n_batches = len(y) // t.bs
    total, step, history = n_batches * t.epochs, 0, []
    for epoch in range(t.epochs):
        t0 = time.perf_counter()
        model.train()
        loss_sum = torch.zeros(())
        # the rows the Ray path's rank 0 of 1 gets, so both loops do the same arithmetic
        for idx in shard_batches(len(y), t.bs, 0, 1, t.seed, epoch, shuffle=True, drop_last=True):
            lr, mom = sched_lr(step / total), sched_mom(step / total)
            for g in opt.param_groups:
                g["lr"], g["betas"] = lr, (mom, g["betas"][1])
            loss = loss_func(model(xc[idx], xn[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            step += 1
        model.eval()
        v_loss, v_acc = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, len(vy), vbs):
                pred = model(vc[i:i + vbs], vn[i:i + vbs])
                yb = vy[i:i + vbs]
                v_loss += loss_func(pred, yb).double() * len(yb)
                v_acc += (pred.argmax(-1) == yb).sum()
        history.append({"epoch": epoch, "train_loss": (loss_sum / (n_batches * t.bs)).item(),
                        "valid_loss": (v_loss / len(vy)).item(), "accuracy": (v_acc / len(vy)).item(),
                        "seconds": time.perf_counter() - t0})
    return history


def model_only_seconds(cfg, frame, threads: int, steps: int = 200) -> tuple[float, float]:
    """(seconds per train step, seconds per validation batch) of the model alone on fixed batches:
    forward + backward + AdamW, and a no-grad forward. No data slicing, schedule or bookkeeping."""
    import torch

    from coursepipe import recipes
    from coursepipe.learn.program import optimizer

    torch.set_num_threads(threads)
    recipe, bs = recipes.get(cfg.name), cfg.train.bs
    kind = recipe.kind
    train_df = frame[~frame["is_valid"]]
    processor = kind.fit_processor(recipe, train_df, cfg.model)
    xc, xn, y = kind.tensors(recipe, processor, train_df)
    model = kind.build_model(recipe, processor, cfg.model).train()
    opt = optimizer(kind.splitter(cfg.model, model), cfg.train)
    loss_func = kind.loss_func(cfg.model)
    for i in range(steps + 20):
        if i == 20:  # warm-up done
            t0 = time.perf_counter()
        loss = loss_func(model(xc[:bs], xn[:bs]), y[:bs])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step_s = (time.perf_counter() - t0) / steps
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(steps // 4):
            vbs = cfg.train.valid_bs
            loss_func(model(xc[:vbs], xn[:vbs]), y[:vbs])
    return step_s, (time.perf_counter() - t0) / (steps // 4)


# ----------------------------------------------------------------------------- the report

def steady(history: list[dict]) -> float:
    """Median epoch seconds after the first (warm-up) epoch."""
    secs = [h["seconds"] for h in history]
    return statistics.median(secs[1:] if len(secs) > 1 else secs)


def secs(history: list[dict]) -> str:
    return "[" + ", ".join(f"{h['seconds']:.2f}" for h in history) + "]"


def table(rows: list[tuple[str, str, str]]) -> str:
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows)


def ray_fit(cfg, frame, storage: Path):
    """The real train path, as the train stage calls it; returns (FitResult, start-up, teardown)."""
    import ray

    from coursepipe.distributed import ray_train

    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        # started here only to keep the workers' log lines (tqdm, reports) out of the table
        ray_train.set_ray_env()
        ray.init(log_to_driver=False, logging_level="WARNING", include_dashboard=False)
    called = time.time()
    from coursepipe import recipes
    fit = ray_train.fit(recipes.get(cfg.name), cfg.model, cfg.train, frame, storage=str(storage),
                        run_name="bench-overhead", verbose=True)
    returned = time.time()
    w = fit.worker
    return fit, w["loop_started"] - called, returned - w["loop_ended"]


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path.insert(0, str(REPO))
    from coursepipe.distributed.ray_train import worker_threads

    cfg = bench_config(args.params, args.rows, args.epochs, args.workers, args.cpus, args.threads)
    t = cfg.train
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        frame = prepared_frame(cfg, Path(tmp) / "proj")
        n_train, n_valid = int((~frame["is_valid"]).sum()), int(frame["is_valid"].sum())
        print(f"adult synthetic: {len(frame)} rows ({n_train} train), bs {t.bs}, lr {t.lr}, "
              f"{t.epochs} epochs; ray: {t.num_workers} worker(s) x {t.cpus_per_worker} cpu, "
              f"{worker_threads(t)} torch thread(s) each", flush=True)
        # bare loops first, while this process and the box have no Ray in them
        threads = worker_threads(t)
        bares = {n: bare_fit(cfg, frame, n) for n in sorted({t.num_workers * t.cpus_per_worker, threads})}
        step_s, valid_s = model_only_seconds(cfg, frame, threads)
        fit, startup_s, teardown_s = ray_fit(cfg, frame, Path(tmp) / "runs")
    driver_rss = max_rss_mb()
    worker = fit.worker
    load1 = os.getloadavg()[0]

    hist = fit.history
    epochs_s = sum(h["seconds"] for h in hist)
    ray_s = steady(hist)
    best_n = min(bares, key=lambda n: steady(bares[n]))
    bare_s = steady(bares[best_n])
    steps = n_train // t.bs  # global steps per epoch; each of W ranks runs them on bs / W rows
    model_s = step_s * steps + valid_s * -(-n_valid // t.valid_bs)
    rows = [("", "seconds", "")]
    rows += [(f"bare loop, {n} thread(s), epoch", f"{steady(b):.3f}", f"epochs {secs(b)}")
             for n, b in bares.items()]
    rows += [
        ("ray fit, epoch", f"{ray_s:.3f}", f"epochs {secs(hist)}"),
        ("model alone, epoch", f"{model_s:.3f}",
         f"{step_s * 1e3:.2f} ms/train step x {steps} + {valid_s * 1e3:.2f} ms/valid batch, "
         f"{threads} thread(s), one process, no loop"),
        ("ray between epochs", f"{fit.train_seconds - epochs_s:.2f}",
         f"checkpoint + report, all {len(hist)} epochs"),
        ("ray start-up", f"{startup_s:.1f}", "fit() called -> train_loop_per_worker starts"),
        ("worker setup", f"{worker['loop_ended'] - worker['loop_started'] - fit.train_seconds:.1f}",
         "processor, tensors, model, checkpoint lookup"),
        ("ray teardown", f"{teardown_s:.1f}", "train_loop_per_worker returns -> fit() returns"),
        ("ray fit() wall", f"{fit.wall_seconds:.1f}",
         f"wall - epoch loop = {fit.wall_seconds - fit.train_seconds:.1f} s of start-up + teardown"),
        ("", "MiB", ""),
        ("driver peak RSS", f"{driver_rss:.0f}", "this process: data, bare loops, Ray driver"),
        ("worker peak RSS", f"{worker['max_rss_mb']:.0f}",
         f"rank 0; torch threads {worker['torch_threads']}, OMP_NUM_THREADS={worker['omp_num_threads']}"),
        ("", "accuracy", ""),
        (f"bare loop, {best_n} thread(s)", f"{bares[best_n][-1]['accuracy']:.4f}", "last epoch"),
        ("ray fit", f"{hist[-1]['accuracy']:.4f}", "last epoch"),
    ]
    print(table(rows))
    print(f"load average {load0:.1f} -> {load1:.1f} on {os.cpu_count()} cores "
          "(other processes on the box skew every number)")
    print(f"outside the model: {1 - model_s / bare_s:.0%} of the bare epoch, "
          f"{1 - model_s / ray_s:.0%} of the ray epoch")
    print(f"ratio ray/bare = {ray_s / bare_s:.2f}x (goal <= {GOAL:.2f}; bare: {best_n} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
