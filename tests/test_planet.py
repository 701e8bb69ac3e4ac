"""planet (lesson 3): the multi-label kind and its recipe. The synthetic sample in Kaggle's layout and
its rule, the COCO layout on fastai's real coco_tiny, bad inputs named before training, the metrics
against fastai's formulas, and one audited fetch -> ... -> export -> predict.py -> web page run
fine-tuned from the packaged ImageNet backbone."""
from __future__ import annotations

import base64
import hashlib
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

from audit import run_pipeline
from conftest import REPO, fetch, load_cfg, small_params, write_params

from coursepipe import config, recipes
from coursepipe.data.archive import deterministic_tgz
from coursepipe.data.csvfile import DataError
from coursepipe.kinds import multi_label
from coursepipe.recipes import planet

PLANET = recipes.get("planet")
# params.yaml's `../shared/data` from the main checkout; from a worktree one level deeper
COCO_TINY = next((p for p in (REPO.parent / "shared", REPO.parent.parent / "shared")
                  if (p / "data/fastai_original/coco_tiny.tgz").is_file()),
                 REPO.parent / "shared") / "data/fastai_original/coco_tiny.tgz"
COCO_SHA = "cbd41f46c9d1cf2a30da0c6a6fe4d1c74c970748b619fb1ae443bff183df99be"


def tiny_params(rows: int = 48, **model) -> dict:
    """planet's real section, shrunk: fewer rows, 1 + 1 epochs, small parity check."""
    raw = small_params(recipes=("planet",))
    sec = raw["recipes"]["planet"]
    sec["sources"]["synthetic"]["rows"] = rows
    sec["validate"].update({"min_rows": 10, "min_per_class": 1})
    sec["model"].update(model)
    sec["train"].update({"epochs": 1, "freeze_epochs": 1, "bs": 16, "num_workers": 1})
    sec["evaluate"].update({"top_losses": 4, "gradcam": 2})
    sec["export"]["parity_rows"] = 16
    return raw


def cfg_of(raw: dict):
    return config.parse(raw, recipes.Registry()).recipe("planet")


def extract(blob: bytes, to: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        tf.extractall(to, filter="data")
    return to


def members(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


# ----------------------------------------------------------------------------- sample and layouts

def test_synthetic_sample_is_kaggle_layout_with_planet_tags_by_a_known_rule(tmp_path):
    blob = planet.synthesize(40, seed=1)
    assert blob == planet.synthesize(40, seed=1) and blob != planet.synthesize(40, seed=2)
    files = members(blob)
    assert files["planet/train_v2.csv"].startswith(b"image_name,tags\ntrain_0,")
    assert b"not satellite images" in files["planet/SYNTHETIC.txt"]
    p = cfg_of(tiny_params()).prepare
    df = PLANET.normalise(planet.read_raw(extract(blob, tmp_path), p))
    assert list(df.columns) == list(planet.COLUMNS) and len(df) == 40
    assert df["path"].str.match(r"^planet/train-jpg/train_\d+\.jpg$").all()
    tags = [t.split() for t in df["tags"]]
    assert all(sum(w in row for w in planet.WEATHER) == 1 for row in tags)   # one weather tag each
    assert all(row == ["cloudy"] for row in tags if "cloudy" in row)         # cloudy hides the land
    assert {t for row in tags for t in row} <= set(planet.PLANET_TAGS)
    assert all(row == sorted(row) for row in tags)                           # prepared form: sorted
    out = PLANET.kind.prepare(PLANET, df, p)
    valid = out["is_valid"].to_numpy()
    assert valid.sum() == 8 and "label" not in out and "class_images" not in out
    # tag_images: the fewest training images among the row's tags, counted by hand
    # (prepared rows come in a seeded random order: read the tags back from the table)
    tags = [t.split() for t in out["tags"]]
    train_tags = [t for row, v in zip(tags, valid) if not v for t in row]
    assert out["tag_images"].tolist() == [min(train_tags.count(t) for t in row) for row in tags]


def test_any_csv_of_file_and_tags_with_a_delimiter_and_a_valid_column(tmp_path):
    from coursepipe.vision.synthetic import encode, shape_image

    rng = np.random.default_rng(0)
    tree = {f"d/img/{i}.png": encode(shape_image("circle", (200, 40, 40), rng), "PNG") for i in range(6)}
    tree["d/labels.csv"] = ("file,labels,valid\n" + "".join(
        f"img/{i}.png,b|a||c{i % 2},{'yes' if i > 3 else 'no'}\n" for i in range(6))).encode()
    raw = tiny_params()
    raw["recipes"]["planet"]["prepare"]["csv"].update({
        "file": "d/labels.csv", "folder": "", "suffix": "", "columns": ["file", "labels"],
        "label_delim": "|", "valid_column": "valid", "vocabulary": []})
    p = cfg_of(raw).prepare
    df = PLANET.kind.prepare(PLANET, PLANET.normalise(PLANET.read_raw(extract(deterministic_tgz(tree), tmp_path), p)), p)
    df = df.sort_values("path", ignore_index=True)                           # prepared rows are shuffled
    assert df["tags"].tolist() == [f"a b c{i % 2}" for i in range(6)]       # split, stripped, sorted
    assert df["is_valid"].tolist() == [i > 3 for i in range(6)]


def bad_archive(tmp_path: Path, name: str, edit) -> Path:
    files = members(planet.synthesize(12, seed=0))
    lines = files["planet/train_v2.csv"].decode().splitlines()
    files["planet/train_v2.csv"] = ("\n".join(edit(lines)) + "\n").encode()
    return extract(deterministic_tgz(files), tmp_path / name)


def test_bad_inputs_stop_prepare_naming_the_row_and_the_file(tmp_path):
    p = cfg_of(tiny_params()).prepare
    cases = (
        ("missing", lambda l: [*l, "train_99,clear primary"],
         r"train_v2\.csv: row 13: 'train_99' \(planet/train-jpg/train_99\.jpg\) is not a file in the archive"),
        ("unknown", lambda l: [l[0], "train_0,clear jungle", *l[2:]],
         r"1 tag\(s\) not in the vocabulary .*'jungle' \(planet/train-jpg/train_0\.jpg\)"),
        ("empty", lambda l: [l[0], "train_0,", *l[2:]], r"row 1: 'train_0' has an empty 'tags'"),
        ("outside", lambda l: [*l, "../../../etc/passwd,clear"], r"row 13: '../../../etc/passwd' points outside"),
    )
    for name, edit, message in cases:
        with pytest.raises(DataError, match=message):
            PLANET.read_raw(bad_archive(tmp_path, name, edit), p)


def coco_archive(tmp_path: Path, annotations: list[dict]) -> Path:
    from coursepipe.vision.synthetic import encode, shape_image

    rng = np.random.default_rng(0)
    doc = {"categories": [{"id": 1, "name": "teddy bear"}, {"id": 2, "name": "vase"}],
           "images": [{"id": i, "file_name": f"{i}.jpg"} for i in range(3)], "annotations": annotations}
    tree = {f"c/train/{i}.jpg": encode(shape_image("square", (40, 70, 200), rng), "JPEG") for i in range(3)}
    tree["c/train.json"] = json.dumps(doc).encode()
    return extract(deterministic_tgz(tree), tmp_path)


def test_coco_layout_tags_are_the_categories_present(tmp_path):
    raw = tiny_params()
    raw["recipes"]["planet"]["prepare"].update({"layout": "coco", "coco": {"file": "c/train.json", "folder": "train"}})
    p = cfg_of(raw).prepare
    boxes = [{"image_id": 0, "category_id": 1}, {"image_id": 0, "category_id": 1},
             {"image_id": 1, "category_id": 2}, {"image_id": 2, "category_id": 2}, {"image_id": 2, "category_id": 1}]
    df = PLANET.read_raw(coco_archive(tmp_path / "a", boxes), p)
    assert df["tags"].tolist() == ["teddy_bear", "vase", "teddy_bear vase"]
    with pytest.raises(DataError, match=r"annotations\[5\] \(2\.jpg\) has category_id 7, which is not in categories"):
        PLANET.read_raw(coco_archive(tmp_path / "b", [*boxes, {"image_id": 2, "category_id": 7}]), p)
    with pytest.raises(DataError, match=r"image 1 \(1\.jpg\) has no annotations"):
        PLANET.read_raw(coco_archive(tmp_path / "c", boxes[:2] + boxes[3:]), p)


@pytest.mark.skipif(not COCO_TINY.is_file(), reason="fastai's coco_tiny is not in ../shared/data")
def test_real_coco_tiny_becomes_tags_per_image(tmp_path):
    blob = COCO_TINY.read_bytes()
    assert hashlib.sha256(blob).hexdigest() == COCO_SHA
    raw = tiny_params()
    raw["recipes"]["planet"]["prepare"]["layout"] = "coco"
    p = cfg_of(raw).prepare
    df = PLANET.normalise(PLANET.read_raw(extract(blob, tmp_path), p))
    assert len(df) == 200 and df["decodable"].all()
    counts = pd.Series([t for row in df["tags"] for t in row.split()]).value_counts().to_dict()
    # README's numbers: 200 images, 6 categories, 688 boxes; images per category counted once each
    assert counts == {"chair": 107, "book": 53, "vase": 42, "couch": 27, "tv": 21, "remote": 14}
    assert (df["tags"].str.count(" ") + 1).value_counts().to_dict() == {1: 160, 2: 25, 3: 8, 4: 5, 5: 2}


def test_config_names_the_bad_key():
    for section, key, value, match in (
            ("model", "threshold", 1.5, r"model\.threshold: must be in \(0, 1\)"),
            ("model", "beta", 0.0, r"model\.beta: must be > 0"),
            ("evaluate", "thresholds", [0.5, 0.2, 0.1], r"evaluate\.thresholds"),
            ("prepare", "layout", "folders", r"prepare\.layout")):
        raw = tiny_params()
        raw["recipes"]["planet"][section][key] = value
        with pytest.raises(config.ConfigError, match=rf"recipes\.planet\.{match}"):
            cfg_of(raw)
    raw = tiny_params()
    raw["recipes"]["planet"]["prepare"]["csv"]["vocabulary"] = ["clear", "slash burn"]
    with pytest.raises(config.ConfigError, match=r"prepare\.csv.*vocabulary.*'slash burn'"):
        cfg_of(raw)


# ----------------------------------------------------------------------------- metrics

def fastai_fbeta(probs: torch.Tensor, y: torch.Tensor, thresh: float, beta: float, eps: float = 1e-9) -> float:
    """fastai v1's fbeta (metrics.py), written out: the samples average of each row's F-beta."""
    pred = (probs > thresh).float()
    tp = (pred * y).sum(1)
    prec, rec = tp / (pred.sum(1) + eps), tp / (y.sum(1) + eps)
    return float((prec * rec / (prec * beta ** 2 + rec + eps) * (1 + beta ** 2)).mean())


def test_metrics_are_fastais_accuracy_thresh_and_samples_fbeta():
    from sklearn.metrics import fbeta_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=g) * 2
    y = (torch.rand(64, 7, generator=g) < 0.3).float()
    y[0] = 0                                                   # an image with no tags scores 0
    probs = torch.sigmoid(logits)
    for thresh, beta in ((0.2, 2.0), (0.5, 1.0)):
        s, n = multi_label.fbeta_samples(logits, y, thresh, beta)
        assert n == 64 and abs(float(s / n) - fastai_fbeta(probs, y, thresh, beta)) < 1e-6
        sk = fbeta_score(y.numpy(), (probs > thresh).numpy(), beta=beta, average="samples", zero_division=0)
        assert abs(float(s / n) - sk) < 1e-6
        a, m = multi_label.accuracy_thresh(logits, y, thresh)
        assert m == 64 * 7 and abs(float(a / m) - float(((probs > thresh) == y.bool()).float().mean())) < 1e-6
    sweep = multi_label.threshold_sweep(probs, y, 0.1, 0.9, 0.1, 2.0)
    assert sweep["threshold"].tolist() == pytest.approx([0.1 * i for i in range(1, 10)])
    assert sweep["fbeta"].iloc[1] == pytest.approx(fastai_fbeta(probs, y, 0.2, 2.0), abs=1e-6)


def test_portable_decoding_matches_the_image_kind():
    """predict.py's copy of the decoding is the training side's (the export's parity check
    compares them on every export too)."""
    from coursepipe.export import portable_image, portable_multi_label
    from coursepipe.vision.synthetic import encode, shape_image

    rng = np.random.default_rng(3)
    blobs = [encode(shape_image("cross", (40, 170, 60), rng, side=s), f) for s, f in ((50, "PNG"), (90, "JPEG"))]
    state = {"mode": "RGB", "size": [64, 48], "resize": "crop"}
    assert np.array_equal(portable_multi_label.preprocess(state, blobs),
                          portable_image.preprocess(state, blobs))


# ----------------------------------------------------------------------------- the stages

def test_planet_stages_end_to_end_predict_and_page(project, ray_session, tmp_path):
    """Kaggle's layout through every stage, audited, fine-tuned from the packaged ImageNet
    EfficientNet-Lite0, exported, tagged by predict.py and served on the tags page."""
    from coursepipe.serve.models import TagsModel, discover
    from coursepipe.stages import prepare, train
    from coursepipe.validation.suites import init_suite

    write_params(project.root, tiny_params(rows=48))
    cfg = load_cfg(project, "planet")
    init_suite(cfg, PLANET, project)  # the committed suite is baked for the 400-image default
    fetch(cfg, project)
    done = run_pipeline(cfg, PLANET, project, storage=project.runs(".runs"))
    assert done["prepare"].rows == 48 and done["validate"].success
    assert [h["epoch"] for h in done["train"].history] == [0, 1]
    assert {"accuracy_thresh", "fbeta", "valid_loss"} <= set(done["train"].history[-1])
    m = done["evaluate"].metrics
    assert m["n_valid"] == 10 and m["threshold"] == 0.2 and m["beta"] == 2.0
    assert 0 <= m["fbeta"] <= m["fbeta_at_best"] <= 1 and 0.05 <= m["best_threshold"] <= 0.95
    plots = project.plots("planet")
    for name in ("per_tag.png", "thresholds.png", "worst_images.png", "gradcam.png"):
        assert (plots / name).read_bytes()[:4] == b"\x89PNG", name
    table = pd.read_csv(plots / "per_tag.csv")
    assert m[f"n_actual_{table['tag'].iloc[0]}"] == table["n_actual"].iloc[0]

    out = done["export"]
    assert out.parity_max_diff <= cfg.export.parity_atol
    card = json.loads((out.path / "card.json").read_text())
    assert card["kind"] == "multi_label" and card["threshold"] == 0.2 and card["course"]["value"] == 0.931

    # predict.py: the tags above the threshold, most probable first, with their probabilities
    bundle = train.load_model(project, PLANET)
    valid = prepare.load(project, "planet").query("is_valid").head(4)
    files = []
    for i, data in enumerate(valid["image"]):
        files.append(tmp_path / f"chip{i}.jpg")
        files[-1].write_bytes(data)
    x, _ = PLANET.kind.tensors(PLANET, bundle.processor, valid)
    with torch.no_grad():
        probs = torch.sigmoid(bundle.model(x)).numpy()
    classes = bundle.processor["classes"]
    for thresh in (None, 0.5):
        t = 0.2 if thresh is None else thresh
        args = [] if thresh is None else ["--threshold", str(thresh)]
        proc = subprocess.run([sys.executable, str(out.path / "predict.py"), *args, *map(str, files)],
                              capture_output=True, text=True, cwd=tmp_path, check=True)
        got = pd.read_csv(io.StringIO(proc.stdout), keep_default_na=False)
        for row, p in zip(got.itertuples(), probs):
            order = [i for i in np.argsort(-p, kind="stable") if p[i] > t]
            assert row.tags == " ".join(classes[i] for i in order)
            shown = [float(v) for v in row.probabilities.split()]
            assert shown == pytest.approx([p[i] for i in order], abs=2e-3)

    # the web page's model: the same tags for uploaded bytes; the tags route is the image route
    limits = recipes.load_params(project.params).serve
    served = discover(project.root / "export", limits)["planet"]
    assert isinstance(served, TagsModel) and served.form()["threshold"] == 0.2
    result = served.predict([{"name": "chip0.jpg", "image_base64": base64.b64encode(files[0].read_bytes()).decode()}])
    expected = [classes[i] for i in np.argsort(-probs[0], kind="stable") if probs[0][i] > 0.2]
    assert [t["label"] for t in result[0]["tags"]] == expected
    assert result[0]["label"] == (" ".join(expected) or "no tag above 0.2")

    # the app: the page's form says what it shows; the upload route answers with the tags
    from fastapi.testclient import TestClient

    from coursepipe.serve.app import create_app

    client = TestClient(create_app(project.root / "export", limits))
    page = client.get("/models/planet")
    assert page.status_code == 200 and "shown when their probability is above 0.2" in page.text
    r = client.post("/api/models/planet/images", files=[("files", ("chip0.jpg", files[0].read_bytes(), "image/jpeg"))])
    assert r.status_code == 200 and r.json()["outputs"][0]["tags"] == result[0]["tags"]
