"""Fault injection: SIGKILL a real stage command at a random moment, then run it again.

Not part of the default `./run tests` (it takes minutes and is random by design); run it with
`./run tests -m faults`. FAULT_KILLS (default 3) kills per stage, FAULT_SEED fixes the moments.
Each kill takes the command's whole process group (the driver, and the local Ray instance it
started), as a power cut or an OOM killer would. After every kill the next run must finish,
say where it resumed, and leave outputs that verify; the summary line per stage says how many
kills were survived and how many finished epochs were lost.
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, copy_project_files, small_params, write_params

pytestmark = pytest.mark.faults

KILLS = int(os.environ.get("FAULT_KILLS", "3"))
RNG = random.Random(int(os.environ.get("FAULT_SEED", str(int(time.time())))))
EPOCHS = 6
ANSI = r"(?:\x1b\[[0-9;]*m)?"
EPOCH_LINE = re.compile(rf"^{ANSI}\s*(?:\(RayTrainWorker[^)]*\){ANSI}\s*)?(\d+)\s{{2,}}\d", re.M)  # EpochTable rows


def start(root: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("COURSEPIPE_LOCKS", None)
    return subprocess.Popen([sys.executable, "-m", "coursepipe.cli", "--root", str(root), *args],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(root: Path, *args: str) -> str:
    proc = start(root, *args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def kill_after(proc: subprocess.Popen, seconds: float) -> str:
    """SIGKILL the command's process group after `seconds` (or when it ends); its output."""
    try:
        out, _ = proc.communicate(timeout=seconds)
        return out  # it finished first
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    raw = small_params(rows=20000)
    # bs 16: ~2 s epochs, so a kill in the 20-40 s window often lands inside training
    raw["recipes"]["adult"]["train"].update({"epochs": EPOCHS, "bs": 16, "checkpoints_kept": 2})
    write_params(root, raw)
    copy_project_files(root)
    finish(root, "fetch", "adult", "--no-dvc")
    return root


def verify_outputs(root: Path) -> None:
    from coursepipe import recipes
    from coursepipe.paths import Paths
    from coursepipe.stages import prepare, train

    paths = Paths(root)
    assert len(prepare.load(paths, "adult")) > 0
    assert train.load_model(paths, recipes.get("adult")).history  # weights_only, complete
    assert not list(root.rglob(f".*{'.tmp-'}*"))                  # no temp folder left


def test_prepare_survives_kills(root):
    for k in range(KILLS):
        kill_after(start(root, "prepare", "adult"), RNG.uniform(1.0, 8.0))
        finish(root, "prepare", "adult")
        from coursepipe.paths import Paths
        from coursepipe.stages import prepare
        assert len(prepare.load(Paths(root), "adult")) == 20000
        assert not list((root / "prepared").glob(".adult.tmp-*"))
    finish(root, "validate", "adult")
    print(f"\nprepare: {KILLS} kills survived")


def test_train_survives_kills_and_resumes_where_it_says(root):
    lost, resumed_at = [], []
    for k in range(KILLS):
        out = kill_after(start(root, "train", "adult"), RNG.uniform(20.0, 40.0))
        done_before = sorted({int(e) for e in EPOCH_LINE.findall(out)})
        out2 = finish(root, "train", "adult")
        m = re.search(r"resumed from checkpoint after epoch (\d+)", out2)
        finished = int(m.group(1)) + 1 if m else 0
        if len(done_before) >= 2:  # a checkpoint was surely registered: the run must resume
            assert m, f"no resume after epochs {done_before} were done:\n{out2[-3000:]}"
        lost.append(max(0, (max(done_before) + 1 if done_before else 0) - finished))
        resumed_at.append(int(m.group(1)) if m else None)
        hist = pd.read_csv(root / "reports" / "adult" / "history.csv")
        assert hist["epoch"].tolist() == list(range(EPOCHS)), hist  # every epoch exactly once
        verify_outputs(root)
        # a new train seed, so the next round is a new run (the same one would just be finished)
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["recipes"]["adult"]["train"]["seed"] = 100 + k
        write_params(root, raw)
    print(f"\ntrain: {KILLS} kills survived; resumed after epoch {resumed_at} (None: from scratch); "
          f"finished epochs lost per kill {lost}")


def test_export_survives_kills(root):
    finish(root, "validate", "adult")
    finish(root, "evaluate", "adult")
    for k in range(KILLS):
        kill_after(start(root, "export", "adult"), RNG.uniform(2.0, 12.0))
        finish(root, "export", "adult")
        folder = root / "export" / "adult"
        assert {"model.onnx", "predict.py", "card.json"} <= {p.name for p in folder.iterdir()}
        assert not list(folder.parent.glob(".adult.tmp-*"))
    print(f"\nexport: {KILLS} kills survived")
