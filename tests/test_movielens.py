"""movielens recipe: both raw layouts, the synthetic sample, validation of bad ratings, the unseen-id
policy, the models, and one full fetch -> ... -> export -> predict.py run on tiny synthetic data."""
from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from audit import run_pipeline, run_stage
from conftest import fetch, load_cfg, small_params, write_params

from coursepipe import config, recipes
from coursepipe.config import evolve
from coursepipe.export import portable_collab as port
from coursepipe.kinds import collab
from coursepipe.recipes import movielens as ml

ML = recipes.get("movielens")

ROWS = 10_000  # synthetic ratings: 298 users x 532 items


def ml_params(**train) -> dict:
    raw = small_params(recipes=("movielens",))
    sec = raw["recipes"]["movielens"]
    sec["sources"]["synthetic"]["rows"] = ROWS
    sec["train"].update({"epochs": 3, "bs": 64, "lr": 0.01, **train})
    sec["export"]["parity_rows"] = 256
    return raw


@pytest.fixture
def ml_project(project):
    """The `project` root with params holding only a shrunk movielens section."""
    write_params(project.root, ml_params())
    return project


@pytest.fixture
def ml_cfg(ml_project):
    return load_cfg(ml_project, "movielens")


def write_ml100k(root: Path, rows: list[str], items: list[str] | None) -> Path:
    (root / "ml-100k").mkdir(parents=True)
    (root / "ml-100k" / "u.data").write_text("".join(r + "\n" for r in rows))
    if items is not None:
        (root / "ml-100k" / "u.item").write_bytes("".join(i + "\n" for i in items).encode("latin-1"))
    return root


# ----------------------------------------------------------------------------- raw layouts

def test_read_raw_ml100k_with_latin1_titles(tmp_path):
    root = write_ml100k(tmp_path, ["196\t242\t3\t881250949", "186\t302\t3\t891717742",
                                   "22\t242\t1\t878887116", "5\t999\t4\t878887117"],
                        ["242|Kolya (1996)|24-Jan-1997||http://x|0|0",
                         "302|L.A. Confidential (1997)|01-Jan-1997||x|0",
                         "999|Café au lait (1993)|01-Jan-1993||x|0"])
    df = ml.normalise(ml.read_raw(root))
    assert list(df.columns) == list(ml.COLUMNS)
    assert str(df["user"].dtype) == "int64" and str(df["item"].dtype) == "int64"
    assert df["rating"].tolist() == [3.0, 3.0, 1.0, 4.0]
    assert df["title"].tolist() == ["Kolya (1996)", "L.A. Confidential (1997)", "Kolya (1996)",
                                    "Café au lait (1993)"]  # u.item is latin-1


def test_read_raw_ml_sample_layout_and_missing_files(tmp_path):
    (tmp_path / "movie_lens_sample").mkdir()
    (tmp_path / "movie_lens_sample" / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n73,1097,4.0,1255504951\n561,924,3.5,1172695223\n")
    df = ml.normalise(ml.read_raw(tmp_path))
    assert df[["user", "item"]].values.tolist() == [[73, 1097], [561, 924]]
    assert df["rating"].tolist() == [4.0, 3.5] and df["title"].isna().all()
    with pytest.raises(FileNotFoundError, match="u.data"):
        ml.read_raw(tmp_path / "movie_lens_sample")


def test_normalise_keeps_bad_ids_for_validation_to_name():
    raw = pd.DataFrame({"user": ["1", "2.5"], "item": ["7", "x9"], "rating": ["4", "5"],
                        "timestamp": ["1", "2"], "title": [None, "t"]})
    df = ml.normalise(raw)
    assert str(df["user"].dtype) == "float64" and df["user"].tolist() == [1.0, 2.5]
    assert df["item"].tolist() == ["7", "x9"]  # strings: the regex rule quotes 'x9'


# ----------------------------------------------------------------------------- synthetic sample

def test_synthesize_is_deterministic_labelled_and_in_the_ml100k_layout(tmp_path):
    blob = ml.synthesize(rows=ROWS, seed=3)
    assert blob == ml.synthesize(rows=ROWS, seed=3) and blob != ml.synthesize(rows=ROWS, seed=4)
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        files = sorted(m.name for m in tf.getmembers() if m.isfile())
        assert files == sorted([ml.DATA_MEMBER, ml.ITEM_MEMBER, ml.README_MEMBER])
        tf.extractall(tmp_path, filter="data")
    assert "SYNTHETIC" in (tmp_path / ml.README_MEMBER).read_text()
    df = ml.normalise(ml.read_raw(tmp_path))
    assert len(df) == ROWS and not df.duplicated(["user", "item"]).any()
    assert set(df["rating"]) <= {1.0, 2.0, 3.0, 4.0, 5.0} and df["rating"].nunique() == 5
    assert df["title"].str.contains("(synthetic)", regex=False).all()
    counts = df["item"].value_counts()
    assert counts.iloc[0] > 3 * counts.median()  # skewed popularity, as in MovieLens


# ----------------------------------------------------------------------------- ids and models

def test_lookup_maps_unseen_and_non_integer_ids_to_na():
    state = {"users": [3, 10, 42], "items": [5]}
    rows = pd.DataFrame({"userId": [42, 3, 7, 2.5, "x"], "movieId": [5, 6, 5, 5, 5]})
    users, items = port.encode(state, rows)
    assert users.tolist() == [3, 1, 0, 0, 0] and items.tolist() == [1, 0, 1, 1, 1]
    with pytest.raises(KeyError, match="'item'"):
        port.encode(state, pd.DataFrame({"user": [1]}))


@pytest.mark.parametrize("arch", ["dot", "nn"])
def test_models_stay_inside_y_range(arch):
    torch.manual_seed(0)
    cfg = collab.CollabModel(arch=arch, n_factors=8, y_range=(0.0, 5.5), nn_layers=(100,), nn_ps=(0.0,),
                             nn_emb_drop=0.0)
    model = ML.kind.build_model(ML, {"users": list(range(20)), "items": list(range(30))}, cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0).add_(torch.randn_like(p) * 50)  # huge weights: the sigmoid must still bound it
        out = model(torch.randint(0, 21, (64,)), torch.randint(0, 31, (64,)))
    assert out.shape == (64,) and out.min() >= 0.0 and out.max() <= 5.5
    assert model.item_factors().shape[0] == 31  # + #na#


def test_config_rejects_bad_model_settings():
    raw = ml_params()
    raw["recipes"]["movielens"]["model"]["y_range"] = [5.5, 0.0]
    with pytest.raises(config.ConfigError, match=r"recipes\.movielens\.model\.y_range: must be"):
        config.parse(raw, recipes.Registry())
    raw = ml_params()
    raw["recipes"]["movielens"]["prepare"]["unseen"] = "drop"
    with pytest.raises(config.ConfigError, match=r"prepare.unseen: 'drop' is not one of \['allow', 'error'\]"):
        config.parse(raw, recipes.Registry())


# ----------------------------------------------------------------------------- unseen policy

def test_unseen_policy_counts_names_and_can_refuse(ml_cfg, capsys):
    from coursepipe.data.split import split_mask

    df = pd.DataFrame({"user": np.arange(2000) % 50, "item": np.arange(2000) // 50,
                       "rating": 3.0, "timestamp": 1, "title": None})
    odd = int(np.flatnonzero(split_mask(len(df), ml_cfg.prepare.valid_pct, ml_cfg.prepare.seed))[0])
    df.loc[odd, ["user", "item"]] = [777, 888]  # a validation row with a new user and a new item
    mask = ML.kind.prepare(ML, df, ml_cfg.prepare)["is_valid"].to_numpy()
    assert mask[odd] and mask.sum() == 200
    out = capsys.readouterr().out
    assert "1 valid user(s) unseen in training (1 rows) e.g. [777]" in out
    assert "1 valid item(s) unseen in training (1 rows) e.g. [888]" in out and "policy: allow" in out
    strict = evolve(ml_cfg.prepare, unseen="error")
    with pytest.raises(ValueError, match=r"prepare.unseen=error: 1 valid user\(s\).*\[777\].*\[888\]"):
        ML.kind.prepare(ML, df, strict)


# ----------------------------------------------------------------------------- stages

@pytest.fixture
def ml_prepared(ml_project, ml_cfg):
    fetch(ml_cfg, ml_project)
    run_stage("prepare", ml_cfg, ML, ml_project)  # audited: reads and code within dvc.yaml's
    return ml_project


def test_validation_names_column_rule_and_values_of_bad_ratings(ml_prepared, ml_cfg):
    from coursepipe.stages import prepare, validate

    assert validate.run(ml_cfg, ML, ml_prepared).success  # the synthetic sample passes as generated
    table = ml_prepared.prepared("movielens") / prepare.TABLE
    df = pd.read_parquet(table)
    df.loc[3, "rating"] = 7.0                                    # off the 0.5..5 scale
    df = pd.concat([df, df.iloc[[10]]], ignore_index=True)       # the same (user, item) twice
    df["user"] = df["user"].astype("float64")
    df.loc[5, "user"] = 2.5                                      # not an id
    df.to_parquet(table, index=False)
    with pytest.raises(validate.ValidationFailed) as e:
        validate.run(ml_cfg, ML, ml_prepared)
    msg = str(e.value)
    assert "column 'rating' expect_column_values_to_be_between: 1 rows" in msg and "[7.0]" in msg
    assert "expect_compound_columns_to_be_unique: 2 rows" in msg
    pair = df.iloc[10]
    assert f"[{pair['user']}, {pair['item']}]" in msg
    assert "column 'user' expect_column_values_to_match_regex: 1 rows" in msg and "[2.5]" in msg
    assert "column 'user' expect_column_values_to_be_in_type_list: observed 'float64'" in msg
    report = json.loads(ml_prepared.validation_report("movielens").read_text())
    assert report["failed"] == 4 and not report["success"]


def test_stages_end_to_end_and_predict_from_the_export_alone(ml_prepared, ml_cfg, ray_session, tmp_path,
                                                            capsys):
    from coursepipe.stages import prepare, train

    paths = ml_prepared
    # every stage audited: it reads only the params and runs only the code dvc.yaml declares
    done = run_pipeline(ml_cfg, ML, paths, paths.runs(".runs"), stages=("validate", "train", "evaluate", "export"))
    result = done["evaluate"]
    m = result.metrics
    valid = prepare.load(paths, "movielens").query("is_valid")
    assert m["n_valid"] == len(valid) == ROWS // 10
    assert m["rmse"] == pytest.approx(m["mse"] ** 0.5, rel=1e-4)
    # better than always predicting the training mean: the factors and biases learned something
    assert m["mse"] < 0.9 * float(((valid["rating"] - valid["rating"].mean()) ** 2).mean())
    plots = paths.plots("movielens")
    ranking = pd.read_csv(plots / collab.BIAS_CSV)
    assert len(ranking) == 2 * ml_cfg.evaluate.interpret_show and set(ranking["end"]) == {"top", "bottom"}
    top, bottom = ranking.query("end == 'top'")["bias"], ranking.query("end == 'bottom'")["bias"]
    assert top.is_monotonic_decreasing and top.min() > bottom.max()
    assert ranking["title"].str.contains("(synthetic)", regex=False).all()
    assert result.plot_path == plots / collab.PCA_PNG and result.plot_path.read_bytes()[:4] == b"\x89PNG"

    out = done["export"]
    assert out.parity_max_diff <= ml_cfg.export.parity_atol
    # predict.py alone, from a copy of the folder, in a fresh interpreter
    alone = tmp_path / "alone"
    import shutil
    shutil.copytree(out.path, alone)
    rows = valid.head(5)[["user", "item"]].rename(columns={"user": "userId", "item": "movieId"})
    rows = pd.concat([rows, pd.DataFrame({"userId": [99_999], "movieId": [rows["movieId"].iloc[0]]})])
    rows.to_csv(tmp_path / "rows.csv", index=False)
    proc = subprocess.run([sys.executable, str(alone / "predict.py"), str(tmp_path / "rows.csv")],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    got = pd.read_csv(io.StringIO(proc.stdout))
    bundle = train.load_model(paths, ML)
    with torch.no_grad():
        users, items, _ = ML.kind.tensors(ML, bundle.processor, valid.head(5))
        expected = bundle.model(users, items).numpy()
    np.testing.assert_allclose(got["prediction"].to_numpy()[:5], expected, atol=1e-4)
    assert got["known_user"].tolist() == [True] * 5 + [False]
    # --user ranks every known item; the copied predict.py, imported from its file, needs no coursepipe
    spec = importlib.util.spec_from_file_location("predict_alone", alone / "predict.py")
    alone_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(alone_mod)
    assert alone_mod.main(["--user", str(int(valid["user"].iloc[0])), "--top", "4"]) == 0
    top4 = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(top4) == 4 and top4["prediction"].is_monotonic_decreasing
    assert top4["title"].str.contains("(synthetic)", regex=False).all()
    assert alone_mod.main([]) == 2 and "give either ROWS.csv or --user ID" in capsys.readouterr().err


def test_nn_arch_evaluates_and_exports_without_training(ml_prepared, ml_cfg):
    """The embedding-NN variant through evaluate and export (untrained weights: no Ray fit)."""
    from coursepipe.stages import evaluate, export, prepare, train

    cfg = evolve(ml_cfg, model=evolve(ml_cfg.model, arch="nn"), export=evolve(ml_cfg.export, parity_rows=64))
    frame = prepare.load(ml_prepared, "movielens")
    processor = ML.kind.fit_processor(ML, frame[~frame["is_valid"]], cfg.model)
    torch.manual_seed(0)
    model = ML.kind.build_model(ML, processor, cfg.model)
    train.save_bundle(ml_prepared, cfg, model.state_dict(), processor, [], summary={})
    m = evaluate.run(cfg, ML, ml_prepared).metrics
    assert m["n_valid"] == ROWS // 10 and 0 < m["mse"] < 25
    ranking = pd.read_csv(ml_prepared.plots("movielens") / collab.BIAS_CSV)
    assert "mean_prediction" in ranking.columns  # nn has no bias: ranked by mean predicted rating
    assert export.run(cfg, ML, ml_prepared).parity_max_diff <= cfg.export.parity_atol
