"""`coursepipe <stage> <recipe>`: the door dvc.yaml, the Prefect tasks and `ray job submit` call.

Every command takes --root (default: the current directory) and reads <root>/params.yaml.
This is the door that looks a recipe up by name: each stage is handed its typed config and its
Recipe object. Expected failures (bad params, bad data, a failed validation) print one clear line
and exit 1.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from coursepipe.paths import Paths
from coursepipe.stages import STAGES


def _cfg(args):
    """(params, the recipe's config, its Recipe object)."""
    from coursepipe import recipes
    params = recipes.load_params(Path(args.params) if args.params else Paths(args.root).params)
    return params, params.recipe(args.recipe), recipes.get(args.recipe)


def dvc_track_data(root: Path) -> None:
    """`dvc add data` + `dvc push`: version the raw archives (only inside a DVC repo)."""
    if not (root / ".dvc").is_dir():
        print(f"{root} is not a DVC repo: data/ left untracked", file=sys.stderr)
        return
    for cmd in (["dvc", "add", "data"], ["dvc", "push", "data.dvc"]):
        subprocess.run([sys.executable, "-m", "dvc", *cmd[1:]], cwd=root, check=True)


def cmd_fetch(args) -> None:
    with recipe_lock(args):
        fetch_source(args)


def fetch_source(args) -> None:
    from coursepipe import recipes
    from coursepipe.config import ConfigError, evolve
    from coursepipe.sources import fetch
    params, cfg, _ = _cfg(args)
    if args.source:  # fetch a source other than the active one (for `dvc exp run -S`)
        if args.source not in cfg.sources:
            raise ConfigError(f"recipes.{cfg.name}.sources has no {args.source!r}; "
                              f"choose from {sorted(cfg.sources)}")
        cfg = evolve(cfg, source=args.source)
    paths = Paths(args.root)
    generator = cfg.active_source.generate
    path = fetch(cfg, paths.data, paths.root, force=args.force, timeout=params.fetch_timeout_s,
                 synthesize=recipes.get(generator).synthesize if generator else None)
    print(f"fetched {cfg.source!r} -> {path.relative_to(paths.root)}")
    if not args.no_dvc:
        dvc_track_data(paths.root)


def recipe_lock(args):
    """One writer per recipe and root: a second pipeline or stage command fails naming the first."""
    from coursepipe import locks
    return locks.hold(locks.recipe_lock(Paths(args.root).root, args.recipe), f"recipe {args.recipe}")


def cmd_stage(args) -> None:
    with recipe_lock(args):
        run_stage(args)


def run_stage(args) -> None:
    import importlib
    params, cfg, recipe = _cfg(args)
    paths = Paths(args.root)
    stage = importlib.import_module(f"coursepipe.stages.{args.command}")
    t0 = time.perf_counter()
    if args.command == "train":
        result = stage.run(cfg, recipe, paths, storage=paths.runs(params.ray_storage))
    else:
        result = stage.run(cfg, recipe, paths)
    print(f"{args.command}@{cfg.name} done in {time.perf_counter() - t0:.1f}s: {summary(result)}")


def summary(result) -> str:
    import dataclasses
    if dataclasses.is_dataclass(result):
        keep = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
        keep = {k: v for k, v in keep.items() if not isinstance(v, (list, dict, tuple))
                and (v is None or isinstance(v, (str, int, float, bool, Path)))}
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items())
    return str(result)


def seed_root(root: Path, source: Path) -> None:
    """Give a fresh output root (shared storage) the params and suites of the code it runs with."""
    import shutil
    root.mkdir(parents=True, exist_ok=True)
    if source.resolve() == root.resolve():
        return
    if not (root / "params.yaml").exists():
        shutil.copy(source / "params.yaml", root / "params.yaml")
    if not (root / "gx").exists() and (source / "gx").is_dir():
        shutil.copytree(source / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))


def cmd_pipeline(args) -> None:
    """Every stage of a recipe in this process: the `ray job submit` entry point."""
    seed_root(Path(args.root), Path(args.seed_from))
    args.force, args.no_dvc = False, not args.dvc
    with recipe_lock(args):
        if not args.skip_fetch:
            cmd_fetch(args)  # idempotent: a verified archive is kept
        for stage in STAGES:
            args.command = stage
            run_stage(args)


def cmd_lr_find(args) -> None:
    """The LR finder on the prepared training rows, in this process (no Ray): PNG + suggestions."""
    from coursepipe.io import write_bytes, write_json
    from coursepipe.learn import fine_tune, lr_finder, program
    from coursepipe.stages import prepare
    _, cfg, recipe = _cfg(args)
    paths = Paths(args.root)
    # the training program's own set-up (seeds, threads, Learner), entered as training starts
    parts = program.build(recipe, cfg.model, cfg.train, prepare.load(paths, cfg.name),
                          program.Hooks(show=False))
    program.enter_phase(parts, fine_tune.phases(cfg.train)[0], cfg.train)
    result = lr_finder.lr_find(parts.learn, args.start_lr, args.end_lr, args.num_it)
    out = paths.validation_report(cfg.name).parent  # not plots/: that folder is evaluate's output
    write_bytes(out / "lr_find.png", lr_finder.plot(result, f"{cfg.name}: LR finder"))
    write_json(out / "lr_find.json", result)
    tips = ", ".join(f"{k} {v:.2e}" for k, v in result["suggestions"].items())
    print(f"lr-find@{cfg.name}: suggested learning rates: {tips} "
          f"(plot: {(out / 'lr_find.png').relative_to(paths.root)})")


def cmd_gx_init(args) -> None:
    from coursepipe.validation.suites import init_suite
    _, cfg, recipe = _cfg(args)
    paths = Paths(args.root)
    print(f"wrote {init_suite(cfg, recipe, paths).relative_to(paths.root)}")


def cmd_gradcam(args) -> None:
    """Grad-CAM overlays of the trained model for any image files: <out>/<file stem>.gradcam.png."""
    import torch
    from coursepipe import recipes
    from coursepipe.contract import ContractError
    from coursepipe.io import write_bytes
    from coursepipe.stages import train
    from coursepipe.vision.images import decode_many
    from coursepipe.kinds.image import ImageClassification, gradcam_png
    recipe = recipes.get(args.recipe)
    if not isinstance(recipe.kind, ImageClassification):
        raise ContractError(f"gradcam: {args.recipe} is a {recipe.kind.name} recipe, not an image one")
    paths = Paths(args.root)
    bundle = train.load_model(paths, recipe)
    proc = bundle.processor
    out = Path(args.out) if args.out else paths.validation_report(recipe.name).parent / "gradcam"
    for file in map(Path, args.images):
        if not file.is_file():
            raise FileNotFoundError(f"gradcam: {file}: no such file")
        try:
            x = torch.from_numpy(decode_many([file.read_bytes()], proc["mode"], tuple(proc["size"]), proc["resize"]))
        except Exception as e:  # PIL raises many types for a file that is not an image
            raise ValueError(f"gradcam: {file}: not a readable image ({type(e).__name__})") from None
        dest = out / f"{file.stem}.gradcam.png"
        write_bytes(dest, gradcam_png(bundle.model, x, list(proc["classes"]), [file.name]))
        print(f"wrote {dest}")


def cmd_summary(args) -> None:
    from coursepipe import summary
    from coursepipe import recipes
    paths = Paths(args.root)
    names = args.recipes or list(recipes.load_params(paths.params).recipes)
    print(summary.table(summary.rows(paths, [recipes.get(n) for n in names])))


def cmd_predict(args) -> None:
    import importlib
    import pandas as pd
    from coursepipe import recipes
    portable = importlib.import_module(recipes.get(args.recipe).kind.portable)
    export_dir = Path(args.export) if args.export else Paths(args.root).export(args.recipe)
    if len(args.rows) == 1 and args.rows[0].endswith(".csv"):
        rows = pd.read_csv(args.rows[0], skipinitialspace=True, na_values=["?"])
    else:  # files to label (images): one row each, read by the portable module
        rows = pd.DataFrame({"path": args.rows})
    from coursepipe.export.portable_csv import write_csv
    out = portable.predict_frame(export_dir, rows)
    write_csv(out, args.out or sys.stdout)


def cmd_serve(args) -> None:
    from coursepipe.config import load_serve
    from coursepipe.serve import run
    paths = Paths(args.root)
    limits = load_serve(Path(args.params) if args.params else paths.params)  # no recipe code: no torch
    root = Path(args.export_root or limits.export_root)
    root = root if root.is_absolute() else paths.root / root
    host, port = args.host or limits.host, args.port or limits.port
    if args.ray:
        run.deploy(root, limits, host, port, blocking=True)
    else:
        run.serve_local(root, limits, host, port)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="coursepipe", description=__doc__.splitlines()[0])
    p.add_argument("--root", default=os.getcwd(), help="project root (default: current directory)")
    p.add_argument("--params", default=None, help="params file (default: <root>/params.yaml)")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="fetch a recipe's source archive into data/ and version it")
    f.add_argument("recipe")
    f.add_argument("--source", help="fetch this source instead of the active one")
    f.add_argument("--force", action="store_true", help="fetch again even if the file verifies")
    f.add_argument("--no-dvc", action="store_true", help="skip `dvc add data` / `dvc push`")
    f.set_defaults(fn=cmd_fetch)

    for stage in STAGES:
        s = sub.add_parser(stage, help=f"run the {stage} stage of a recipe")
        s.add_argument("recipe")
        s.set_defaults(fn=cmd_stage)

    pl = sub.add_parser("pipeline", help="fetch + every stage in one process (for `ray job submit`)")
    pl.add_argument("recipe")
    pl.add_argument("--skip-fetch", action="store_true")
    pl.add_argument("--seed-from", default=os.getcwd(),
                    help="copy params.yaml and gx/ from here into a root that lacks them (default: .)")
    pl.add_argument("--dvc", action="store_true",
                    help="also `dvc add data` + `dvc push` (off: a job's root is usually no DVC repo)")
    pl.set_defaults(fn=cmd_pipeline, source=None)  # pipeline fetches the active source

    lf = sub.add_parser("lr-find", help="run the LR finder (plot + suggested learning rates)")
    lf.add_argument("recipe")
    lf.add_argument("--start-lr", type=float, default=1e-7)
    lf.add_argument("--end-lr", type=float, default=10.0)
    lf.add_argument("--num-it", type=int, default=100)
    lf.set_defaults(fn=cmd_lr_find)

    g = sub.add_parser("gx-init", help="(re)write a recipe's Great Expectations suite from params")
    g.add_argument("recipe")
    g.set_defaults(fn=cmd_gx_init)

    gc = sub.add_parser("gradcam", help="Grad-CAM overlays of an image recipe's trained model for image files")
    gc.add_argument("recipe")
    gc.add_argument("images", nargs="+")
    gc.add_argument("--out", help="folder for <stem>.gradcam.png (default: <root>/reports/<recipe>/gradcam)")
    gc.set_defaults(fn=cmd_gradcam)

    sm = sub.add_parser("summary", help="recipe, headline metric, the course's result, training seconds")
    sm.add_argument("recipes", nargs="*", help="default: every recipe in params.yaml")
    sm.set_defaults(fn=cmd_summary)

    pr = sub.add_parser("predict", help="label CSV rows with an exported model (export alone)")
    pr.add_argument("recipe")
    pr.add_argument("rows", nargs="+", help="a CSV with the model's input columns, or files to "
                                            "label (e.g. images)")
    pr.add_argument("--export", help="export folder (default: <root>/export/<recipe>)")
    pr.add_argument("--out", help="output CSV (default: stdout)")
    pr.set_defaults(fn=cmd_predict)

    sv = sub.add_parser("serve", help="web pages + JSON API for every exported model (uvicorn, or Ray Serve)")
    sv.add_argument("--host", help="default: params.yaml serve.host")
    sv.add_argument("--port", type=int, help="default: params.yaml serve.port")
    sv.add_argument("--export-root", help="folder of <recipe>/ exports (default: serve.export_root)")
    sv.add_argument("--ray", action="store_true",
                    help="run as a Ray Serve deployment (serve.ray: replicas, autoscaling; joins RAY_ADDRESS)")
    sv.set_defaults(fn=cmd_serve)
    return p


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures whose message says it all: printed as one line, no traceback kept."""
    from coursepipe.config import ConfigError
    from coursepipe.contract import ContractError
    from coursepipe.data.archive import ArchiveError
    from coursepipe.locks import Locked
    from coursepipe.sources import SourceError
    errors: list[type[BaseException]] = [ConfigError, ContractError, ArchiveError, SourceError,
                                         Locked, FileNotFoundError, KeyError, ValueError]
    try:
        from coursepipe.stages.validate import ValidationFailed
        from coursepipe.stages.train import NotValidated
        errors += [ValidationFailed, NotValidated]
    except ImportError:
        pass
    return tuple(errors)


def error_log(root: str | Path) -> Path:
    return Path(root) / ".logs" / "coursepipe.log"


def keep_traceback(root: str | Path, argv: list[str]) -> Path | None:
    """Append the current exception's traceback to <root>/.logs/coursepipe.log."""
    import traceback
    path = error_log(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} coursepipe {' '.join(argv)}\n")
            f.write(traceback.format_exc())
            worker = getattr(sys.exc_info()[1], "worker_traceback", None)
            if worker:  # raised in a Ray worker: its own stack, not the driver's
                f.write(f"in the Ray worker:\n{worker}")
    except OSError:
        return None
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except expected_errors() as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"coursepipe {args.command}: error: {msg}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else: one line here, the traceback in the log
        first = (str(e).strip().splitlines() or ["(no message)"])[0]
        where = keep_traceback(args.root, argv)
        print(f"coursepipe {args.command}: error: {type(e).__name__}: {first}"
              + (f" (traceback: {where})" if where else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
