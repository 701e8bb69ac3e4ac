"""A project with a real export of each kind, for the serving tests (API, load, browser).

Each recipe is fetched (generated data), prepared, trained in-process for one short pass (no Ray:
the app serves whatever export/<recipe>/ holds, however it was trained), evaluated and exported
by the real stages, so model.onnx, preprocessing.json, predict.py and card.json are the
pipeline's own.
"""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import copy_project_files, fetch, load_cfg, small_params, write_params

# one recipe per kind the app renders: tabular form, recommendations, text, image upload
SERVED = ("adult", "movielens", "human_numbers", "mnist")


def shrink(raw: dict) -> dict:
    """Fewer rows and one epoch: the tests need a working export, not a good model."""
    r = raw["recipes"]
    if "movielens" in r:
        r["movielens"]["sources"]["synthetic"]["rows"] = 3000
    if "mnist" in r:
        r["mnist"]["sources"]["synthetic"]["rows"] = 200
        r["mnist"]["validate"].update({"min_rows": 50, "min_per_class": 5})
        r["mnist"]["evaluate"].update({"top_losses": 1, "gradcam": 1})
    return raw


def build_exports(root: Path, recipes_: tuple[str, ...] = SERVED) -> Path:
    """root/export/<recipe>/ for each recipe; returns root."""
    from coursepipe import recipes
    from coursepipe.config import evolve
    from coursepipe.learn import program
    from coursepipe.paths import Paths
    from coursepipe.stages import evaluate, export, prepare, train

    root.mkdir(parents=True, exist_ok=True)
    write_params(root, shrink(small_params(recipes=recipes_)))
    copy_project_files(root)
    paths = Paths(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a busy 2-core box
    try:
        for name in recipes_:
            cfg, recipe = load_cfg(paths, name), recipes.get(name)
            fetch(cfg, paths)
            prepare.run(cfg, recipe, paths)
            out = program.train(recipe, cfg.model, evolve(cfg.train, epochs=1),
                                prepare.load(paths, name), program.Hooks(show=False))
            train.save_bundle(paths, cfg, out.parts.model.state_dict(), out.parts.processor,
                              history=[{"epoch": 0}], summary={"run_name": f"{name}-serve-test"})
            evaluate.run(cfg, recipe, paths)
            export.run(cfg, recipe, paths)
    finally:
        torch.set_num_threads(threads)
    return root
