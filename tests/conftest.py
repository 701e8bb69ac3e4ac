"""Shared fixtures: a tiny project per test (real params.yaml, shrunk), one Ray session."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Quiet, offline, deterministic: set before Ray / Prefect / DVC are imported by any test.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")


def small_params(rows: int = 2000, **train) -> dict:
    """The real params.yaml with the adult sample shrunk: same keys, fewer rows, 1 epoch."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    adult = raw["recipes"]["adult"]
    adult["sources"]["synthetic"]["rows"] = rows
    adult["train"].update({"epochs": 1, "bs": 64, "num_workers": 1, **train})
    return raw


def write_params(root: Path, raw: dict) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def copy_project_files(root: Path) -> None:
    """What a clone holds that the stages read: dvc.yaml, gx/ suites, .dvc/config."""
    for name in ("dvc.yaml",):
        if (REPO / name).exists():
            shutil.copy(REPO / name, root / name)
    if (REPO / "gx").is_dir():
        shutil.copytree(REPO / "gx", root / "gx", ignore=shutil.ignore_patterns("uncommitted"))


@pytest.fixture
def project(tmp_path) -> "Paths":
    """A fresh project root with small params and the committed gx/ suites."""
    from coursepipe.paths import Paths

    root = tmp_path / "proj"
    root.mkdir()
    write_params(root, small_params())
    copy_project_files(root)
    return Paths(root)


@pytest.fixture
def adult_cfg(project):
    from coursepipe import config
    return config.load(project.params).recipe("adult")


@pytest.fixture
def prepared(project, adult_cfg):
    """Fetched (synthetic) and prepared adult data in `project`."""
    from coursepipe.sources import fetch
    from coursepipe.stages import prepare

    fetch(adult_cfg, project.data, project.root)
    prepare.run(adult_cfg, project)
    return project


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that trains (start-up costs ~5-10 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    yield
    ray.shutdown()
