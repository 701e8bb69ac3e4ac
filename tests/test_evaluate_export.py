"""evaluate and export stages and the portable predict path, on a model trained in-process (no Ray).

One module-scoped project is fetched, prepared, trained (plain torch, a few hundred steps),
evaluated and exported once; tests that break things work on a copy of it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from audit import run_stage
from conftest import copy_project_files, fetch, load_cfg, small_params, write_params
from coursepipe import cli, recipes
from coursepipe.config import evolve
from coursepipe.export import portable_tabular as portable
from coursepipe.learn import interpret, program
from coursepipe.paths import Paths
from coursepipe.stages import evaluate, export, prepare, train

ADULT = recipes.get("adult")

EPOCHS = 8         # 8 passes over 1600 training rows at bs 64: 200 AdamW steps, ~1 s on one thread
RUN_NAME = "adult-inprocess-test"


def fit_in_process(cfg, recipe, frame: pd.DataFrame, epochs: int = EPOCHS):
    """A trained model the way train.run would save it, by the training program without Ray."""
    out = program.train(recipe, cfg.model, evolve(cfg.train, epochs=epochs), frame, program.Hooks(show=False))
    return out.parts.model.eval(), out.parts.processor


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model on a busy 2-core box: 200 steps took 0.5 s on 1 thread, 2.6-15 s on 2."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def done(tmp_path_factory, one_thread):
    """The `prepared` fixture's project, built once per module, then trained, evaluated, exported."""
    root = tmp_path_factory.mktemp("proj")
    write_params(root, small_params())
    copy_project_files(root)
    paths = Paths(root)
    cfg = load_cfg(paths)
    fetch(cfg, paths)
    prepare.run(cfg, ADULT, paths)
    model, processor = fit_in_process(cfg, ADULT, prepare.load(paths, "adult"))
    train.save_bundle(paths, cfg, model.state_dict(), processor,
                      history=[{"epoch": 0}], summary={"run_name": RUN_NAME})
    ev = run_stage("evaluate", cfg, ADULT, paths)  # audited: reads and code within dvc.yaml's
    ex = run_stage("export", cfg, ADULT, paths)
    return paths, cfg, ev, ex


def valid_frame(paths) -> pd.DataFrame:
    return evaluate.valid_rows(paths, "adult")


def torch_labels(paths, cfg, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of the saved PyTorch model for the rows of df (target included)."""
    bundle = train.load_model(paths, ADULT)
    x_cat, x_cont, _ = ADULT.kind.tensors(ADULT, bundle.processor, df)
    with torch.no_grad():
        proba = torch.softmax(bundle.model(x_cat, x_cont), 1).numpy()
    return np.asarray(ADULT.schema.classes, dtype=object)[proba.argmax(1)], proba


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- interpret (pure)

def test_confusion_matrix_and_metrics_count_correctly():
    actual = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 0, 1, 0, 2])
    cm = interpret.confusion_matrix(actual, predicted, 3)
    assert cm.tolist() == [[2, 1, 0], [1, 1, 0], [0, 0, 1]]
    m = interpret.classification_metrics(actual, predicted, ["a", "b", "c"])
    assert m["n_valid"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    assert m["error_rate"] == pytest.approx(2 / 6) and m["majority_rate"] == pytest.approx(3 / 6)
    assert (m["n_actual_a"], m["n_predicted_a"], m["n_correct_a"]) == (3, 3, 2)
    assert m["recall_b"] == pytest.approx(0.5) and m["precision_c"] == 1.0
    csv = interpret.confusion_csv(actual, predicted, ["a", "b,x", "c"])
    assert csv.splitlines()[:3] == ["actual,predicted", "a,a", 'a,"b,x"']


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_writes_metrics_png_and_csv(done):
    paths, cfg, ev, _ = done
    valid = valid_frame(paths)
    metrics = json.loads(paths.metrics("adult").read_text())
    assert all(not isinstance(v, (dict, list)) for v in metrics.values())  # flat for dvc metrics
    majority = valid["salary"].value_counts(normalize=True).max()
    assert metrics["n_valid"] == len(valid) == ev.metrics["n_valid"]
    assert metrics["accuracy"] > majority + 0.03, (metrics["accuracy"], majority)
    assert metrics["accuracy"] + metrics["error_rate"] == pytest.approx(1.0)
    assert 0 < metrics["valid_loss"] < np.log(2)  # better than a coin's cross-entropy
    counts = valid["salary"].value_counts()
    assert {c: metrics[f"n_actual_{c}"] for c in counts.index} == counts.to_dict()

    labels, proba = torch_labels(paths, cfg, valid)
    assert metrics["accuracy"] == pytest.approx((labels == valid["salary"].to_numpy()).mean(), abs=1e-6)
    y = torch.tensor((valid["salary"] == ">=50k").to_numpy().astype(np.int64))
    nll = torch.nn.functional.nll_loss(torch.log(torch.tensor(proba)), y).item()
    assert metrics["valid_loss"] == pytest.approx(nll, abs=1e-4)

    png = paths.plots("adult") / "confusion_matrix.png"
    assert ev.plot_path == png and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    image = matplotlib.image.imread(png)  # decodes: a real, complete PNG
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    cm = pd.read_csv(paths.plots("adult") / "confusion_matrix.csv")
    assert list(cm.columns) == ["actual", "predicted"] and len(cm) == len(valid)
    assert set(cm["actual"]) | set(cm["predicted"]) <= {"<50k", ">=50k"}
    assert list(cm["actual"]) == list(valid["salary"])
    assert (cm["actual"] == cm["predicted"]).mean() == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert not list(paths.plots("adult").glob(".*"))  # no temp files left behind


# ----------------------------------------------------------------------------- export

def test_export_folder_card_and_parity(done):
    paths, cfg, _, ex = done
    folder = paths.export("adult")
    assert ex.path == folder
    assert sorted(p.name for p in folder.iterdir()) == \
        ["card.json", "model.onnx", "portable_csv.py", "predict.py", "preprocessing.json"]
    assert 0 <= ex.parity_max_diff <= cfg.export.parity_atol
    assert ex.parity_rows == min(cfg.export.parity_rows, len(valid_frame(paths)))
    assert ex.exporter in ("dynamo", "torchscript")
    assert (folder / "predict.py").read_bytes() == Path(portable.__file__).read_bytes()

    state_text = (folder / "preprocessing.json").read_text()
    processor = train.load_model(paths, ADULT).processor
    assert json.loads(state_text) == processor
    proto = onnx.load(str(folder / "model.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}["preprocessing"] == state_text
    assert proto.opset_import[0].version == cfg.export.opset
    inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
    assert inputs["x_cat"].elem_type == onnx.TensorProto.INT64
    assert inputs["x_cont"].elem_type == onnx.TensorProto.FLOAT
    assert inputs["x_cat"].shape.dim[0].dim_param  # dynamic batch
    assert inputs["x_cat"].shape.dim[1].dim_value == len(processor["cat_names"]) + len(processor["na_names"])
    assert inputs["x_cont"].shape.dim[1].dim_value == len(processor["cont_names"])

    card = json.loads((folder / "card.json").read_text())
    assert card["recipe"] == "adult" and card["kind"] == "tabular_classification"
    assert card["classes"] == ["<50k", ">=50k"] and card["target"] == "salary"
    assert card["input_columns"]["categorical"] == list(cfg.model.cat_names)
    assert card["run_name"] == RUN_NAME
    assert card["metrics"] == json.loads(paths.metrics("adult").read_text())
    assert card["export"]["parity_max_abs_diff"] == ex.parity_max_diff
    assert card["export"]["exporter"] == ex.exporter
    table = paths.prepared("adult") / prepare.TABLE
    assert card["data"]["prepared_table_sha256"] == hashlib.sha256(table.read_bytes()).hexdigest()
    archive = paths.data / cfg.source_file
    assert card["data"]["archive"] == cfg.source_file == str(archive.relative_to(paths.data))
    assert card["data"]["archive_md5"] == hashlib.md5(archive.read_bytes()).hexdigest()
    assert card["data"]["source"] == "synthetic"
    assert card["params"]["train"]["lr"] == cfg.train.lr and card["params"]["prepare"]["seed"] == 42
    assert card["params"]["model"]["cat_names"] == list(cfg.model.cat_names)
    assert card["versions"]["torch"] == torch.__version__


def test_cli_predict_labels_rows_like_torch(done, tmp_path):
    paths, cfg, _, _ = done
    valid = valid_frame(paths)
    rows = tmp_path / "rows.csv"
    valid.drop(columns=["salary", "is_valid"]).to_csv(rows, index=False)
    out = tmp_path / "out.csv"
    assert cli.main(["--root", str(paths.root), "predict", "adult", str(rows), "--out", str(out)]) == 0
    labelled = pd.read_csv(out)
    labels, proba = torch_labels(paths, cfg, valid)
    assert len(labelled) == len(valid)
    assert list(labelled["prediction"]) == list(labels)
    np.testing.assert_allclose(labelled["probability"], proba.max(1), atol=1e-4)


def test_unseen_category_and_missing_values(done):
    paths, cfg, _, _ = done
    processor = train.load_model(paths, ADULT).processor
    assert processor["na_names"] == []  # the synthetic sample has no missing numbers to flag
    valid = valid_frame(paths)
    base = valid[valid[processor["cat_names"]].notna().all(axis=1)].head(1)  # no #na# of its own
    rows = pd.concat([base] * 5, ignore_index=True)
    rows.loc[0, "workclass"] = "Astronaut"            # never seen in training
    rows.loc[1, "workclass"] = None                   # missing category
    rows.loc[2, "age"] = np.nan                       # missing number
    rows.loc[3, "age"] = processor["medians"]["age"]  # what a missing number is filled with
    rows.loc[4, "occupation"] = "#na#"                # the unknown level itself

    cats, conts = portable.preprocess(processor, rows)
    col = processor["cat_names"].index
    assert cats[0, col("workclass")] == cats[1, col("workclass")] == 0  # level 0 is #na#
    assert cats[4, col("occupation")] == 0 and (cats[2:4] > 0).all()
    assert np.isfinite(conts).all()

    out = portable.predict_frame(paths.export("adult"), rows)
    assert out["prediction"].isin(["<50k", ">=50k"]).all()
    p = out["probability"].to_numpy()
    assert p[0] == p[1]  # unseen and missing both map to #na#
    assert p[2] == p[3]  # a missing number is its training median
    _, torch_proba = torch_labels(paths, cfg, rows)
    np.testing.assert_allclose(p, torch_proba.max(1), atol=cfg.export.parity_atol)


def test_missing_column_is_named(done, tmp_path, capsys):
    paths, _, _, _ = done
    rows = valid_frame(paths).head(3).drop(columns=["education-num"])
    with pytest.raises(KeyError, match="education-num"):
        portable.predict_frame(paths.export("adult"), rows)
    csv = tmp_path / "rows.csv"
    rows.to_csv(csv, index=False)
    assert cli.main(["--root", str(paths.root), "predict", "adult", str(csv)]) == 1
    err = capsys.readouterr().err
    assert "missing column(s) ['education-num']" in err and "Traceback" not in err


WRAPPER = """
import runpy, sys
sys.argv = ["predict.py", *sys.argv[1:]]
try:
    runpy.run_path("copy/predict.py", run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "coursepipe")
assert not leaked, leaked
sys.exit(code)
"""


def test_export_folder_predicts_alone_without_coursepipe(done, tmp_path):
    paths, cfg, _, _ = done
    shutil.copytree(paths.export("adult"), tmp_path / "copy")
    valid = valid_frame(paths).head(50).copy()
    valid.loc[0, "workclass"] = "Astronaut"
    valid.loc[1, "age"] = np.nan
    valid.drop(columns=["is_valid"]).to_csv(tmp_path / "rows.csv", index=False)

    def script(*args):
        return subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    ok = script("rows.csv", "out.csv")
    assert ok.returncode == 0, ok.stderr
    labelled = pd.read_csv(tmp_path / "out.csv")
    labels, _ = torch_labels(paths, cfg, valid)
    assert list(labelled["prediction"]) == list(labels)

    valid.drop(columns=["is_valid", "age"]).to_csv(tmp_path / "bad.csv", index=False)
    bad = script("bad.csv")
    assert bad.returncode == 1 and "missing column(s) ['age']" in bad.stderr, bad.stderr

    # model.onnx alone still predicts: preprocessing comes from its metadata
    (tmp_path / "copy" / "preprocessing.json").unlink()
    again = portable.predict_frame(tmp_path / "copy", valid)
    assert list(again["prediction"]) == list(labels)


def test_predict_names_text_in_number_columns_and_neutralises_formula_cells(done, tmp_path):
    paths, cfg, _, _ = done
    shutil.copytree(paths.export("adult"), tmp_path / "copy")
    rows = valid_frame(paths).head(4).drop(columns=["is_valid"]).copy()
    rows["age"] = rows["age"].astype(object)
    rows.loc[rows.index[1], "age"] = "forty"          # used to become the median, silently
    rows.loc[rows.index[2], "workclass"] = "=HYPERLINK(\"http://x\",\"y\")"
    rows.loc[rows.index[3], "occupation"] = "@SUM(A1)"
    rows.to_csv(tmp_path / "rows.csv", index=False)

    def script(*args):
        return subprocess.run([sys.executable, "-c", WRAPPER, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    ok = script("rows.csv", "out.csv")
    assert ok.returncode == 0 and "1 row(s) have number cells that are not numbers" in ok.stderr, ok.stderr
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert out["unparsed"].tolist() == ["", "age='forty'", "", ""]
    text = (tmp_path / "out.csv").read_text()
    assert "'=HYPERLINK" in text and "'@SUM(A1)" in text
    assert not any(cell.startswith(("=", "@", "+")) for line in text.splitlines() for cell in line.split(","))

    strict = script("--strict", "rows.csv", "out2.csv")
    assert strict.returncode == 1 and "row 2: age='forty'" in strict.stderr, strict.stderr
    assert not (tmp_path / "out2.csv").exists()


def test_torchscript_fallback_exports_a_matching_graph(done):
    paths, cfg, _, _ = done
    bundle = train.load_model(paths, ADULT)
    model = bundle.model
    x_cat, x_cont, _ = ADULT.kind.tensors(ADULT, bundle.processor, valid_frame(paths))
    names = export.input_names(model)
    blob = export.onnx_torchscript(model, export.example_inputs((x_cat, x_cont)), names,
                                   cfg.export.opset, export.dynamic_axes(ADULT, names))
    import onnxruntime as ort
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"x_cat": x_cat.numpy(), "x_cont": x_cont.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x_cat, x_cont).numpy(), atol=1e-4)


def test_failed_parity_keeps_the_previous_export(done, tmp_path):
    paths, cfg, _, _ = done
    copy = Paths(tmp_path / "proj")
    shutil.copytree(paths.root, copy.root)
    before = tree_bytes(copy.export("adult"))
    strict = evolve(cfg, export=evolve(cfg.export, parity_atol=-1.0))
    with pytest.raises(export.ParityError, match=r"parity_atol=-1.*left as it was"):
        export.run(strict, ADULT, copy)
    assert tree_bytes(copy.export("adult")) == before
    assert [p.name for p in (copy.root / "export").iterdir()] == ["adult"]  # no temp folders left


def test_card_data_version_pins_data_dvc(done, tmp_path):
    paths, cfg, _, _ = done
    copy = Paths(tmp_path / "proj")
    shutil.copytree(paths.root, copy.root)
    (copy.root / "data.dvc").write_text(
        "outs:\n- md5: 5c91e97249d27ba0daaa0184727a5a4e.dir\n  size: 29517\n  nfiles: 1\n"
        "  hash: md5\n  path: data\n")
    version = export.data_version(copy, "adult")
    assert version["data_dvc_md5"] == "5c91e97249d27ba0daaa0184727a5a4e.dir"
    assert version["archive_md5"] == hashlib.md5((copy.data / cfg.source_file).read_bytes()).hexdigest()
