"""Shared fixtures: a tiny project per test (real params.yaml, shrunk), one Ray session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Quiet, offline, deterministic: set before Ray / Prefect / DVC are imported by any test.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # see ray_train.RAY_ENV
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")


def small_params(rows: int = 2000, recipes: tuple[str, ...] = ("adult",), **train) -> dict:
    """The real params.yaml, only `recipes` kept, adult's sample shrunk: same keys, fewer rows,
    1 epoch. Tests of other recipes shrink their own section from the returned dict."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["recipes"] = {name: raw["recipes"][name] for name in recipes}
    if "adult" in raw["recipes"]:
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


def load_cfg(paths, name: str = "adult"):
    """A recipe's typed config from the project's params.yaml, as the CLI loads it."""
    from coursepipe.recipes import load_params
    return load_params(paths.params).recipe(name)


def fetch(cfg, paths, **kwargs):
    """The fetch command's work: the active source's archive into data/ (generated ones offline)."""
    from coursepipe import recipes
    from coursepipe.sources import fetch as fetch_source

    gen = cfg.active_source.generate
    return fetch_source(cfg, paths.data, paths.root, synthesize=recipes.get(gen).synthesize if gen else None,
                        **kwargs)


@pytest.fixture
def adult():
    from coursepipe import recipes
    return recipes.get("adult")


@pytest.fixture
def adult_cfg(project):
    return load_cfg(project)


@pytest.fixture
def prepared(project, adult_cfg, adult):
    """Fetched (synthetic) and prepared adult data in `project` (prepare audited: tests/audit.py)."""
    from audit import run_stage

    fetch(adult_cfg, project)
    run_stage("prepare", adult_cfg, adult, project)
    return project


@pytest.fixture
def validated(prepared, adult_cfg, adult):
    """`prepared`, validated too: the train stage trains only on a table that passed."""
    from audit import run_stage

    run_stage("validate", adult_cfg, adult, prepared)
    return prepared


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that trains (start-up costs ~5-10 s)."""
    import ray

    # address="local": never join a cluster some other test (or person) started with `ray start`
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def served_root(tmp_path_factory):
    """A project whose export/ holds a real export of each kind (tests/serving.py; ~40 s)."""
    from serving import build_exports
    return build_exports(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="session")
def prefect_api():
    """A real, temporary Prefect API (SQLite) shared by the flow tests (~15 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def venv_env(**extra) -> dict:
    """The environment a stage subprocess gets: this venv's bin/ first on PATH."""
    env = dict(os.environ, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def sh(cmd: list[str], cwd: Path, check: bool = True, **extra) -> subprocess.CompletedProcess:
    """Run a command, capture its output, and show it when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=venv_env(**extra), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    return proc


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "dvc", *args], cwd=repo, check=check)


def make_repo(root: Path, rows: int = 3000) -> Path:
    """A throw-away git + DVC repo holding this project's code and pipeline, with small params."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "uncommitted")
    root.mkdir(parents=True)
    for name in ("coursepipe", "flows", "tasks", "gx"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    (root / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")
    shutil.copy(REPO / ".dvc" / ".gitignore", root / ".dvc" / ".gitignore")
    write_params(root, small_params(rows=rows))
    git = dict(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "project"]):
        sh(cmd, cwd=root, **git)
    return root


@pytest.fixture
def loopback(tmp_path):
    """A real http.server on 127.0.0.1 serving tmp_path/www (weights and archives by URL)."""
    import functools
    import http.server
    import threading

    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
