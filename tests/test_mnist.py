"""mnist recipe: the synthetic sample, the manifest, bad inputs stopped by prepare's policy or by
validation with the files named, and one full, audited fetch -> ... -> export -> predict.py run on
tiny generated digits."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from audit import run_pipeline
from conftest import fetch, load_cfg, small_params, write_params

from coursepipe import config, recipes
from coursepipe.data.archive import deterministic_tgz
from coursepipe.recipes import mnist

MNIST = recipes.get("mnist")

ROWS = 500  # synthetic training images: 50 per digit, 10 per digit in testing/


def mnist_params(**train) -> dict:
    raw = small_params(recipes=("mnist",))
    sec = raw["recipes"]["mnist"]
    sec["sources"]["synthetic"]["rows"] = ROWS
    sec["train"].update({"epochs": 8, "bs": 32, "lr": 0.02, **train})
    sec["export"]["parity_rows"] = 64
    return raw


def load_cfg_from(raw: dict, project=None):
    """mnist's typed config from a raw params dict (written into `project` when given)."""
    if project is None:
        return config.parse(raw, recipes.Registry()).recipe("mnist")
    write_params(project.root, raw)
    return load_cfg(project, "mnist")


@pytest.fixture
def mn_project(project):
    write_params(project.root, mnist_params())
    return project


@pytest.fixture
def mn_cfg(mn_project):
    return load_cfg(mn_project, "mnist")


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
    assert mnist.split(df, None).sum() == 10
    p = load_cfg_from(mnist_params()).prepare
    prepared = MNIST.kind.prepare(MNIST, df, p)
    assert prepared["is_valid"].sum() == 10 and (prepared["excluded"] == "").all()
    # training images per class, on every row of the class (what min_per_class checks)
    assert (prepared["duplicate"] == "").all() and set(prepared["class_images"]) == {5}
    with pytest.raises(FileNotFoundError, match="no mnist_png/ folder"):
        mnist.read_raw(tmp_path / "mnist_png")


def test_config_rejects_unknown_arch_and_mode():
    raw = mnist_params()
    raw["recipes"]["mnist"]["model"]["arch"] = "vgg"
    with pytest.raises(config.ConfigError, match=r"recipes\.mnist\.model\.arch: 'vgg'"):
        config.parse(raw, recipes.Registry())
    raw = mnist_params()
    raw["recipes"]["mnist"]["model"]["mode"] = "CMYK"
    with pytest.raises(config.ConfigError, match=r"recipes\.mnist\.model\.mode: 'CMYK'"):
        config.parse(raw, recipes.Registry())
    raw = mnist_params()
    raw["recipes"]["mnist"]["model"]["augment"]["max_zoom"] = 0.5
    with pytest.raises(config.ConfigError, match=r"recipes\.mnist\.model\.augment\.max_zoom: must be >= 1"):
        config.parse(raw, recipes.Registry())


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


def test_unreadable_files_stop_prepare_naming_them(mn_project, mn_cfg):
    from coursepipe.stages import prepare

    archive = mn_project.data / mn_cfg.source_file
    archive.parent.mkdir(parents=True)
    archive.write_bytes(bad_archive())
    with pytest.raises(ValueError) as err:  # prepare.bad_images: error (the repo's mnist policy)
        prepare.run(mn_cfg, MNIST, mn_project)
    msg = str(err.value)
    assert "2 bad images (prepare.bad_images: error)" in msg
    assert "mnist_png/training/3/corrupt.png: cannot decode" in msg
    assert "mnist_png/training/4/empty.png: empty file (0 bytes)" in msg
    assert not mn_project.prepared("mnist").exists()


def test_excluded_files_are_listed_and_other_bad_inputs_fail_validation(mn_project):
    from coursepipe.stages import prepare, validate

    raw = mnist_params()
    raw["recipes"]["mnist"]["prepare"]["bad_images"] = "exclude"
    cfg = load_cfg_from(raw, mn_project)
    archive = mn_project.data / cfg.source_file
    archive.parent.mkdir(parents=True)
    archive.write_bytes(bad_archive())
    prepare.run(cfg, MNIST, mn_project)
    with pytest.raises(validate.ValidationFailed) as err:
        validate.run(cfg, MNIST, mn_project)
    msg = str(err.value)
    assert "mnist_png/training/x/9.png" in msg and "'x'" in msg          # unknown label folder
    assert "2 copies, e.g. mnist_png/testing/5/copy.png" in msg  # in both splits (the report names both)
    report = json.loads(mn_project.validation_report("mnist").read_text())
    assert any("mnist_png/testing/5/copy.png = mnist_png/training/5/1.png" in str(r["examples"]) for r in report["expectations"])
    assert "2 rows" in msg                                                # ... counted per file
    assert "column 'mode'" not in msg  # the RGB image is converted by the declared rule
    report = json.loads(mn_project.validation_report("mnist").read_text())
    (excluded,) = [r for r in report["expectations"] if r["column"] == "excluded"
                   and r["type"] == "expect_column_values_to_be_in_set"]
    assert excluded["success"] and excluded["unexpected_count"] == 2      # listed, not failed on
    frame = prepare.load(mn_project, "mnist")
    ok = frame[(frame["excluded"] == "") & frame["label"].isin(mnist.CLASSES)]
    proc = MNIST.kind.fit_processor(MNIST, ok[~ok["is_valid"]], cfg.model)
    assert proc["mode"] == "L" and proc["source_modes"]["RGB"] == 1 and proc["converted"] == 1
    x, y = MNIST.kind.tensors(MNIST, proc, ok)
    assert tuple(x.shape[1:]) == (1, 28, 28) and len(y) == len(ok)


# ----------------------------------------------------------------------------- the stages

def test_stages_end_to_end_and_predict_from_the_export_alone(mn_project, mn_cfg, ray_session, tmp_path):
    from coursepipe.kinds.image import CONFUSED_CSV, GRADCAM_PNG, TOP_LOSSES_PNG
    from coursepipe.stages import prepare, train

    paths = mn_project
    fetch(mn_cfg, paths)
    # every stage audited: it reads only the params and runs only the code dvc.yaml declares
    done = run_pipeline(mn_cfg, MNIST, paths, storage=paths.runs(".runs"))
    assert done["validate"].success
    result = done["train"]
    assert len(result.history) == 8 and result.history[-1]["train_loss"] < result.history[0]["train_loss"]

    m = done["evaluate"].metrics
    assert m["n_valid"] == ROWS // 5 and m["accuracy"] > 0.3  # font digits: far above chance (0.1)
    plots = paths.plots("mnist")
    confused = pd.read_csv(plots / CONFUSED_CSV)
    assert list(confused.columns) == ["actual", "predicted", "count"]
    assert confused["count"].sum() == round(m["error_rate"] * m["n_valid"])
    assert (plots / TOP_LOSSES_PNG).read_bytes()[:4] == b"\x89PNG"
    assert (plots / GRADCAM_PNG).read_bytes()[:4] == b"\x89PNG"

    out = done["export"]
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
    bundle = train.load_model(paths, MNIST)
    x, _ = MNIST.kind.tensors(MNIST, bundle.processor, valid)
    expected = [bundle.processor["classes"][i] for i in bundle.model(x).argmax(1).tolist()]
    assert got["prediction"].tolist() == expected + expected[:1]
    assert got["probability"].between(0, 1).all()
    bad = subprocess.run([sys.executable, str(alone / "predict.py"), str(tmp_path / "nope.png")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert bad.returncode == 1 and "nope.png" in bad.stderr
