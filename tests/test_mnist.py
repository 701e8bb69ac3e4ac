"""mnist recipe: the synthetic sample, the manifest, bad inputs stopped by validation with the files
named, and one full fetch -> ... -> export -> predict.py run on tiny generated digits."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import small_params, write_params

from coursepipe import config
from coursepipe.data.archive import deterministic_tgz
from coursepipe.recipes import mnist

ROWS = 500  # synthetic training images: 50 per digit, 10 per digit in testing/


def mnist_params(**train) -> dict:
    raw = small_params(recipes=("mnist",))
    sec = raw["recipes"]["mnist"]
    sec["sources"]["synthetic"]["rows"] = ROWS
    sec["train"].update({"epochs": 8, "bs": 32, "lr": 0.02, **train})
    sec["export"]["parity_rows"] = 64
    return raw


@pytest.fixture
def mn_project(project):
    write_params(project.root, mnist_params())
    return project


@pytest.fixture
def mn_cfg(mn_project):
    return config.load(mn_project.params).recipe("mnist")


def png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- sample and manifest

def test_synthesize_is_deterministic_labelled_and_in_the_mnist_layout(tmp_path):
    blob = mnist.synthesize(100, seed=3)
    assert blob == mnist.synthesize(100, seed=3) and blob != mnist.synthesize(100, seed=4)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        names = [m.name for m in tf.getmembers() if m.isfile()]
        first = Image.open(io.BytesIO(tf.extractfile(names[0]).read()))
    assert len(names) == 100 + 20
    assert all(n.split("/")[-1].startswith("synthetic_") for n in names)
    assert {n.split("/")[1] for n in names} == {"training", "testing"}
    assert first.mode == "L" and first.size == (28, 28)


def test_read_raw_and_normalise_build_the_manifest(tmp_path):
    with tarfile.open(fileobj=io.BytesIO(mnist.synthesize(50, seed=0))) as tf:
        tf.extractall(tmp_path, filter="data")
    df = mnist.normalise(mnist.read_raw(tmp_path))
    assert list(df.columns) == list(mnist.COLUMNS) and len(df) == 60
    assert df["decodable"].all() and (df["width"] == 28).all() and set(df["mode"]) == {"L"}
    assert (df["duplicate"] == "").all() and set(df["class_images"]) == {5, 1}
    assert mnist.split(df, None).sum() == 10
    with pytest.raises(FileNotFoundError, match="no mnist_png/ folder"):
        mnist.read_raw(tmp_path / "mnist_png")


def test_config_rejects_unknown_arch_and_mode():
    raw = mnist_params()
    raw["recipes"]["mnist"]["model"]["arch"] = "vgg"
    with pytest.raises(config.ConfigError, match=r"recipes\.mnist\.model.*arch.*'vgg'"):
        config.parse(raw)
    raw = mnist_params()
    raw["recipes"]["mnist"]["model"]["mode"] = "CMYK"
    with pytest.raises(config.ConfigError, match="mode"):
        config.parse(raw)


# ----------------------------------------------------------------------------- bad inputs

def bad_archive() -> bytes:
    """A small valid set plus one of every bad input, and an RGB image (converted, not an error)."""
    rng = np.random.default_rng(0)
    files = {}
    for folder, n in (("training", 10), ("testing", 10)):
        for d in range(10):
            for i in range(n):
                files[f"mnist_png/{folder}/{d}/{i}.png"] = png(
                    rng.integers(0, 256, (28, 28), dtype=np.uint8), "L")
    files["mnist_png/training/3/corrupt.png"] = files["mnist_png/training/3/0.png"][:60]
    files["mnist_png/training/4/empty.png"] = b""
    files["mnist_png/training/x/9.png"] = files["mnist_png/training/9/0.png"][:]
    files["mnist_png/training/9/0.png"] = png(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L")
    files["mnist_png/testing/5/copy.png"] = files["mnist_png/training/5/1.png"]
    files["mnist_png/training/7/rgb.png"] = png(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8), "RGB")
    return deterministic_tgz(files)


def test_bad_inputs_fail_validation_naming_the_files(mn_project, mn_cfg):
    from coursepipe.stages import prepare, validate

    archive = mn_project.data / mn_cfg.source_file
    archive.parent.mkdir(parents=True)
    archive.write_bytes(bad_archive())
    prepare.run(mn_cfg, mn_project)
    with pytest.raises(validate.ValidationFailed) as err:
        validate.run(mn_cfg, mn_project)
    msg = str(err.value)
    assert "mnist_png/training/3/corrupt.png: cannot decode" in msg
    assert "mnist_png/training/4/empty.png: empty file (0 bytes)" in msg
    assert "mnist_png/training/x/9.png" in msg and "'x'" in msg          # unknown label folder
    assert "mnist_png/testing/5/copy.png = mnist_png/training/5/1.png" in msg  # in both splits
    assert "2 rows" in msg                                                # ... counted per file
    assert "column 'mode'" not in msg  # the RGB image is converted by the declared rule
    frame = prepare.load(mn_project, "mnist")
    ok = frame[frame["decodable"] & frame["label"].isin(mnist.CLASSES)]
    proc = mnist.fit_processor(ok[~ok["is_valid"]], mn_cfg.model)
    assert proc["mode"] == "L" and proc["source_modes"]["RGB"] == 1 and proc["converted"] == 1
    x, y = mnist.tensors(proc, ok)
    assert tuple(x.shape[1:]) == (1, 28, 28) and len(y) == len(ok)


# ----------------------------------------------------------------------------- the stages

def test_stages_end_to_end_and_predict_from_the_export_alone(mn_project, mn_cfg, ray_session, tmp_path):
    from coursepipe.sources import fetch
    from coursepipe.stages import evaluate, export, prepare, train, validate
    from coursepipe.vision.evaluate import CONFUSED_CSV, TOP_LOSSES_PNG

    paths = mn_project
    fetch(mn_cfg, paths.data, paths.root)
    prepare.run(mn_cfg, paths)
    assert validate.run(mn_cfg, paths).success
    result = train.run(mn_cfg, paths, storage=paths.runs(".runs"), verbose=False)
    assert len(result.history) == 8 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]

    m = evaluate.run(mn_cfg, paths).metrics
    assert m["n_valid"] == ROWS // 5 and m["accuracy"] > 0.3  # font digits: far above chance (0.1)
    plots = paths.plots("mnist")
    confused = pd.read_csv(plots / CONFUSED_CSV)
    assert list(confused.columns) == ["actual", "predicted", "count"]
    assert confused["count"].sum() == round(m["error_rate"] * m["n_valid"])
    assert (plots / TOP_LOSSES_PNG).read_bytes()[:4] == b"\x89PNG"

    out = export.run(mn_cfg, paths)
    assert out.parity_max_diff <= mn_cfg.export.parity_atol
    # predict.py alone, from a copy of the folder, in a fresh interpreter, on image files
    alone = tmp_path / "alone"
    shutil.copytree(out.path, alone)
    valid = prepare.load(paths, "mnist").query("is_valid").head(4)
    files = []
    for i, (data, label) in enumerate(zip(valid["image"], valid["label"])):
        files.append(tmp_path / f"img{i}_{label}.png")
        files[-1].write_bytes(data)
    rgb = tmp_path / "rgb.png"  # an RGB file: the export converts it by the recorded rule
    Image.open(files[0]).convert("RGB").save(rgb)
    proc = subprocess.run([sys.executable, str(alone / "predict.py"), *map(str, files), str(rgb)],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    got = pd.read_csv(io.StringIO(proc.stdout), dtype={"prediction": str})
    model, processor, _ = train.load_model(paths, mn_cfg)
    x, _ = mnist.tensors(processor, valid)
    expected = [processor["classes"][i] for i in model(x).argmax(1).tolist()]
    assert got["prediction"].tolist() == expected + expected[:1]
    assert got["probability"].between(0, 1).all()
    bad = subprocess.run([sys.executable, str(alone / "predict.py"), str(tmp_path / "nope.png")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "nope.png" in bad.stderr
