"""Reliability and security: each test first reproduces a way the pipeline used to break.

Planted pickles, corrupt checkpoints, training on rejected data, retried deterministic errors,
raw CSVs that lose their culprit, kills inside atomic_path, two writers on one recipe.
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO
from coursepipe import io, locks
from coursepipe.config import evolve
from coursepipe.data.csvfile import DataError
from coursepipe.distributed import ray_train
from coursepipe.recipes import adult as adult_recipe
from coursepipe.stages import prepare, train


class Planted:
    """A pickle that runs code when unpickled: it creates the marker file."""
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Planted(marker)}, f)


def cli(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "coursepipe.cli", "--root", str(root), *args],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The CLI's failure: exit 1 and exactly one line on stderr (tracebacks go to the log)."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- 1. no code from files

def test_a_planted_model_file_runs_no_code(project, adult, tmp_path):
    marker = tmp_path / "pwned"
    plant(project.model("adult") / train.MODEL_FILE, marker)
    with pytest.raises(ValueError, match="model.pt: not a model bundle"):
        train.load_model(project, adult)
    assert not marker.exists()


def test_a_planted_checkpoint_runs_no_code_even_with_a_matching_checksum(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "checkpoint_2026-01-01_00-00-00.000000"
    plant(folder / ray_train.CKPT_FILE, marker)
    # the attacker can write the checksum too: weights_only still refuses the pickle
    (folder / ray_train.SUM_FILE).write_text(io.file_digest(folder / ray_train.CKPT_FILE))
    with pytest.raises(ray_train.CheckpointError, match="does not load"):
        ray_train.read_checkpoint(folder, folder.name)
    assert not marker.exists()


# ----------------------------------------------------------------------------- 2. verified checkpoints

def test_a_checkpoint_is_verified_before_it_loads(tmp_path):
    state = {"model": {"w": torch.arange(1000.0)}, "epoch": 3}
    ray_train.save_checkpoint(state, tmp_path)
    assert ray_train.read_checkpoint(tmp_path, "good")["epoch"] == 3
    ckpt = tmp_path / ray_train.CKPT_FILE
    blob = bytearray(ckpt.read_bytes())
    blob[len(blob) // 2] ^= 0x40  # one flipped bit inside the tensor data: torch.load would accept it
    ckpt.write_bytes(bytes(blob))
    with pytest.raises(ray_train.CheckpointError, match="flipped.*corrupt"):
        ray_train.read_checkpoint(tmp_path, "flipped")
    (tmp_path / ray_train.SUM_FILE).unlink()
    with pytest.raises(ray_train.CheckpointError, match="incomplete"):
        ray_train.read_checkpoint(tmp_path, "torn")


def checkpoints(storage: str, run: str) -> list[Path]:
    return sorted((p for p in Path(storage, run).glob("checkpoint_*") if p.is_dir()), reverse=True)  # newest first


def test_a_corrupt_newest_checkpoint_falls_back_and_none_good_fails_by_name(
        prepared, adult_cfg, adult, ray_session, capfd):
    frame = prepare.load(prepared, "adult")
    storage, run = prepared.runs(".runs"), "fallback-test"
    t = evolve(adult_cfg.train, epochs=2, checkpoints_kept=2)
    ray_train.fit(adult, adult_cfg.model, t, frame, storage, run, verbose=False)
    newest, older = checkpoints(storage, run)[:2]
    ckpt = newest / ray_train.CKPT_FILE
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated

    capfd.readouterr()
    again = ray_train.fit(adult, adult_cfg.model, t, frame, storage, run, verbose=False)
    said = capfd.readouterr().out
    assert again.start_epoch == 1                       # epoch 1 trained again from epoch 0's state
    assert [h["epoch"] for h in again.history] == [0, 1]
    assert f"skipping checkpoint {newest}" in said and "corrupt" in said, said[-2000:]
    assert f"resuming from the older checkpoint {older}" in said

    for folder in checkpoints(storage, run):          # now spoil every checkpoint kept
        (folder / ray_train.CKPT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ray_train.TrainingError, match="not retried.*no checkpoint of this run verifies") as e:
        ray_train.fit(adult, adult_cfg.model, t, frame, storage, run, verbose=False)
    assert str(Path(storage, run)) in str(e.value)     # the folder to delete is named


# ----------------------------------------------------------------------------- 3. rejected data

def test_train_refuses_a_table_that_failed_or_skipped_validation(prepared, adult_cfg, adult):
    from audit import run_stage
    from coursepipe.stages.validate import ValidationFailed

    storage = prepared.runs(".runs")
    with pytest.raises(train.NotValidated, match="validation.json is missing"):
        train.run(adult_cfg, adult, prepared, storage=storage)
    run_stage("validate", adult_cfg, adult, prepared)
    table = prepared.prepared("adult") / prepare.TABLE
    df = pd.read_parquet(table)
    df.loc[df.index[:5], "workclass"] = "Pirate"
    df.to_parquet(table, index=False)
    with pytest.raises(train.NotValidated, match="another prepared table"):
        train.run(adult_cfg, adult, prepared, storage=storage)
    with pytest.raises(ValidationFailed):
        run_stage("validate", adult_cfg, adult, prepared)
    line = one_error_line(cli(prepared.root, "train", "adult"))
    assert "validation of prepared/adult failed" in line and "refusing to train" in line
    assert not prepared.model("adult").exists()        # nothing trained, nothing replaced


# ----------------------------------------------------------------------------- 4. deterministic errors

def test_a_deterministic_worker_error_is_not_retried_and_names_its_cause(prepared, adult_cfg, adult,
                                                                          ray_session):
    frame = prepare.load(prepared, "adult")
    frame.loc[frame.index[:3], "salary"] = ">50K"      # a label the classes do not have
    t = evolve(adult_cfg.train, max_failures=2)
    with pytest.raises(ray_train.TrainingError) as e:
        ray_train.fit(adult, adult_cfg.model, t, frame, prepared.runs(".runs"), "bad-label", verbose=False)
    msg = str(e.value)
    assert "not retried" in msg and "ValueError" in msg and "'>50K'" in msg and "\n" not in msg
    assert "encode_target" in e.value.worker_traceback   # the worker's own stack, for the log


def test_non_finite_params_fail_as_one_line_naming_the_key(project):
    from conftest import small_params, write_params

    for bad in (float("nan"), float("inf")):
        raw = small_params()
        raw["recipes"]["adult"]["train"]["lr"] = bad
        write_params(project.root, raw)
        line = one_error_line(cli(project.root, "train", "adult"))
        assert "recipes.adult.train.lr: expected a finite number" in line, line


# ----------------------------------------------------------------------------- 5. bad raw CSVs

GOOD_HEADER = ",".join(adult_recipe.COLUMNS)


def adult_csv(tmp_path: Path, text: str) -> Path:
    (tmp_path / adult_recipe.CSV_MEMBER).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / adult_recipe.CSV_MEMBER).write_text(text)
    return tmp_path


def good_rows(n: int) -> list[str]:
    row = "39,State-gov,77516,Bachelors,13,Never-married,Adm-clerical,Not-in-family,White,Male,2174,0,40,United-States,<50k"
    return [row] * n


def test_bad_csvs_name_file_line_column_and_value(tmp_path):
    with pytest.raises(DataError, match=r"adult.csv is empty \(0 bytes\)"):
        adult_recipe.read_raw(adult_csv(tmp_path / "a", ""))

    cut = "\n".join([GOOD_HEADER, *good_rows(5)]) + "\n39,State-gov,775"   # cut mid-row
    with pytest.raises(DataError, match=r"adult.csv: 1 line\(s\).*header \(15\): line 7 has 3 .*truncated"):
        adult_recipe.read_raw(adult_csv(tmp_path / "b", cut))

    rows = good_rows(4)
    rows[2] = rows[2].replace("39,", "forty,", 1)
    with pytest.raises(DataError, match=r"column 'age' has 1 non-numeric value\(s\), e.g. row 3: 'forty'"):
        adult_recipe.read_raw(adult_csv(tmp_path / "c", "\n".join([GOOD_HEADER, *rows]) + "\n"))

    ok = adult_recipe.read_raw(adult_csv(tmp_path / "d", "\n".join([GOOD_HEADER, *good_rows(3)]) + "\n"))
    assert len(ok) == 3 and ok["age"].tolist() == [39.0] * 3


# ----------------------------------------------------------------------------- 6. atomic outputs, locks

KILLER = r"""
import os, signal, sys
from pathlib import Path
from coursepipe import io
dest, step = Path(sys.argv[1]), sys.argv[2]
real = os.replace
calls = []
def replace(a, b):
    calls.append(1)
    if step == "after-park" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)   # between the two renames: dest is missing
    real(a, b)
    if step == "after-swap" and len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)   # new output in place, temp folder not yet removed
io.os.replace = replace
with io.atomic_path(dest) as tmp:
    tmp.mkdir()
    (tmp / "f.txt").write_text("new")
    if step == "in-body":
        os.kill(os.getpid(), signal.SIGKILL)   # half-written new output
"""


@pytest.mark.parametrize("step,expect", [("in-body", "old"), ("after-park", "old"), ("after-swap", "new")])
def test_a_kill_inside_atomic_path_loses_nothing(tmp_path, step, expect):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "f.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLER, str(dest), step], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".out.tmp-*"))            # the kill left its temp folder behind
    if step == "after-park":
        assert not dest.exists()                        # ...and hid the old output in it
    io.recover(dest)                                    # what the next atomic_path does first
    assert (dest / "f.txt").read_text() == expect
    assert not list(tmp_path.glob(".out.tmp-*"))
    with io.atomic_path(dest) as tmp:                   # and the next write works as usual
        tmp.mkdir()
        (tmp / "f.txt").write_text("next")
    assert (dest / "f.txt").read_text() == "next"


def test_a_live_writers_temp_folder_is_left_alone(tmp_path):
    dest = tmp_path / "out"
    with io.atomic_path(dest) as tmp:
        theirs = tmp_path / f".out{io.TMP_TAG}1-abc"    # pid 1 (init) is alive
        theirs.mkdir()
        tmp.write_text("x")
    assert theirs.is_dir() and dest.read_text() == "x"


HOLDER = r"""
import sys, time
from coursepipe import locks
with locks.hold(sys.argv[1], "recipe adult"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_frees_it(project):
    lock = locks.recipe_lock(project.root, "adult")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock), "pipeline", "adult"],
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(cli(project.root, "pipeline", "adult"))
        assert "recipe adult is in use by pid" in line and str(holder.pid) in line and "pipeline adult" in line
        with pytest.raises(locks.Locked):
            with locks.hold(lock, "recipe adult"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with locks.hold(lock, "recipe adult"):              # flock died with its holder
        with locks.hold(lock, "recipe adult"):          # re-entrant (a pipeline's own stages)
            assert os.environ[locks.ENV].endswith(str(lock.resolve()))
    assert locks.ENV not in os.environ


def test_a_run_lock_keeps_two_roots_from_training_one_run(tmp_path):
    storage = str(tmp_path / "shared-runs")
    lock = locks.run_lock(storage, "adult-abc")
    assert locks.run_lock("s3://bucket/runs", "adult-abc") is None
    with locks.hold(lock, "Ray run adult-abc"):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop(locks.ENV)  # another process, not a child that inherits the lock
        code = f"from coursepipe import locks\nwith locks.hold({str(lock)!r}, 'Ray run adult-abc'): pass"
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert proc.returncode == 1 and "Ray run adult-abc is in use by pid" in proc.stderr
    time.sleep(0)  # released: a later process may take it
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0
