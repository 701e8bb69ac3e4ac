"""head_pose (lesson 3): BIWI's files read as the lesson reads them, the synthetic sample in that
layout, bad files named, augmentation that moves the point with the image, the point models, and
one audited fetch -> ... -> export run through real Ray Train, then predict.py and the web page's
API in pixels of the input image."""
from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from audit import run_pipeline
from conftest import fetch, load_cfg, small_params, write_params

from coursepipe import config, recipes
from coursepipe.data.archive import deterministic_tgz
from coursepipe.data.csvfile import DataError
from coursepipe.recipes import head_pose
from coursepipe.vision import points
from coursepipe.vision.augment import Augment

HEAD = recipes.get("head_pose")
CAL = head_pose.calibration_text(517.679, 517.679, 320.0, 240.5)   # BIWI's own numbers


def tiny_params(rows: int = 48, **model) -> dict:
    raw = small_params(recipes=("head_pose",))
    sec = raw["recipes"]["head_pose"]
    sec["sources"]["synthetic"]["rows"] = rows
    sec["validate"]["min_rows"] = 10
    sec["model"].update({"size": [64, 48], **model})
    sec["train"].update({"epochs": 1, "freeze_epochs": 1, "bs": 8, "num_workers": 1})
    sec["evaluate"]["pictures"] = 4
    sec["export"]["parity_rows"] = 8
    return raw


def cfg_of(raw: dict):
    return config.parse(raw, recipes.Registry()).recipe("head_pose")


def extract(blob: bytes, to: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        tf.extractall(to, filter="data")
    return to


def members(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


# ----------------------------------------------------------------------------- BIWI files

def test_calibration_and_pose_files_read_as_the_lesson_and_project(tmp_path):
    (tmp_path / "rgb.cal").write_text(CAL)
    cal = points.read_calibration(tmp_path / "rgb.cal")
    assert cal.tolist() == [[517.679, 0, 320.0], [0, 517.679, 240.5], [0, 0, 1]]
    (tmp_path / "frame_00003_pose.txt").write_text(
        head_pose.pose_text(np.eye(3), np.array([62.9, -5.5, 973.9])))
    centre = points.read_centre(tmp_path / "frame_00003_pose.txt")
    assert centre.tolist() == [62.9, -5.5, 973.9]
    x, y = points.convert_biwi(centre, cal)
    assert (x, y) == pytest.approx((62.9 * 517.679 / 973.9 + 320, -5.5 * 517.679 / 973.9 + 240.5))
    # units: the frame's edges are -1 and 1; the inverse gives the pixels back
    uv = points.to_units(np.array([[0.0, 480.0], [320.0, 240.0]]), [640, 640], [480, 480])
    assert uv.tolist() == [[-1.0, 1.0], [0.0, 0.0]]
    assert points.to_pixels(uv, [640, 640], [480, 480]).tolist() == [[0.0, 480.0], [320.0, 240.0]]


@pytest.mark.parametrize("text, match", [
    ("1 0 0\n0 1 0\n0 0 1\n\n62.9 abc 973.9\n", r"frame_00001_pose.txt: pose file unparsable.*nan"),
    ("1 0 0\n0 1 0\n0 0 1\n\n62.9 -5.5 -973.9\n", r"frame_00001_pose.txt: pose file unparsable.*z > 0"),
    ("", r"frame_00001_pose.txt: pose file unparsable"),
])
def test_a_bad_pose_file_is_named(tmp_path, text, match):
    (tmp_path / "frame_00001_pose.txt").write_text(text)
    with pytest.raises(DataError, match=match):
        points.read_centre(tmp_path / "frame_00001_pose.txt")


def test_a_missing_or_bad_calibration_is_named(tmp_path):
    with pytest.raises(DataError, match=r"rgb.cal: calibration file missing"):
        points.read_calibration(tmp_path / "rgb.cal")
    (tmp_path / "rgb.cal").write_text("garbage\n" * 3)
    with pytest.raises(DataError, match=r"rgb.cal: not a BIWI rgb.cal"):
        points.read_calibration(tmp_path / "rgb.cal")


# ----------------------------------------------------------------------------- the sample and layout

def test_synthetic_sample_is_deterministic_in_the_biwi_layout_with_folder_13_held_out(tmp_path):
    blob = head_pose.synthesize(24, seed=1)
    assert blob == head_pose.synthesize(24, seed=1) and blob != head_pose.synthesize(24, seed=2)
    root = extract(blob, tmp_path)
    assert (root / "biwi_head_pose/SYNTHETIC.txt").is_file()
    assert sorted(p.name for p in (root / "biwi_head_pose").iterdir() if p.is_dir()) == list(head_pose.PEOPLE)
    cfg = cfg_of(tiny_params())
    df = HEAD.kind.prepare(HEAD, head_pose.normalise(head_pose.read_raw(root, cfg.prepare)), cfg.prepare)
    assert len(df) == 24 and df["path"].str.match(head_pose.PATH_REGEX).all()
    assert (df["is_valid"] == (df["person"] == "13")).all() and df["is_valid"].sum() == 4
    assert (df["problem"] == "").all() and set(df["width"]) == {320} and set(df["height"]) == {240}
    # the point is the lesson's projection of the pose file's centre with the folder's rgb.cal
    row = df.iloc[5]
    folder = root / Path(row["path"]).parent
    expect = points.convert_biwi(points.read_centre(root / row["pose_file"]),
                                 points.read_calibration(folder / "rgb.cal"))
    assert (row["x"], row["y"]) == pytest.approx(expect)
    # and the drawn face is there: the point's pixel has the face's colour, not the wall's
    with Image.open(io.BytesIO(row["image"])) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=float)
    centre = rgb[int(row["y"]), int(row["x"])]
    corner = rgb[2, 2]
    assert np.abs(centre - corner).max() > 20


def test_bad_biwi_files_stop_reading_naming_each(tmp_path):
    files = members(head_pose.synthesize(12, seed=0))
    files["biwi_head_pose/01/frame_00000_pose.txt"] = b"1 0 0\n0 1 0\n0 0 1\n\nnot numbers\n"
    del files["biwi_head_pose/02/rgb.cal"]
    del files["biwi_head_pose/03/frame_00002_pose.txt"]
    root = extract(deterministic_tgz(files), tmp_path)
    with pytest.raises(DataError) as err:
        head_pose.read_raw(root, cfg_of(tiny_params()).prepare)
    message = str(err.value)
    assert "3 bad BIWI file(s)" in message
    assert "biwi_head_pose/01/frame_00000_pose.txt: pose file unparsable" in message
    assert "biwi_head_pose/02/rgb.cal: calibration file missing" in message
    assert "biwi_head_pose/03/frame_00002_pose.txt: pose file missing" in message
    assert str(tmp_path) not in message            # named as the archive names them

    other = cfg_of(tiny_params()).prepare
    good = head_pose.normalise(head_pose.read_raw(extract(head_pose.synthesize(12, seed=0), tmp_path / "g"), other))
    outside = good.copy()
    outside.loc[3, "x"] = 400.0                  # beyond the 320 px frame
    with pytest.raises(ValueError, match=r"1 unusable frame\(s\): biwi_head_pose/.*point \(400.0, .*outside its 320x240 frame"):
        HEAD.kind.prepare(HEAD, outside, other)
    raw = tiny_params()
    raw["recipes"]["head_pose"]["prepare"]["valid_folder"] = "99"
    with pytest.raises(ValueError, match=r"valid_folder '99' is not among the person folders \['01'"):
        HEAD.kind.prepare(HEAD, good, cfg_of(raw).prepare)


# ----------------------------------------------------------------------------- augmentation

def dot_image(h: int, w: int, x: int, y: int) -> torch.Tensor:
    """A black (3, h, w) image with a 3x3 white dot centred on pixel (x, y)."""
    img = torch.zeros(3, h, w)
    img[:, y - 1:y + 2, x - 1:x + 2] = 1.0
    return img


def brightest(img: torch.Tensor) -> np.ndarray:
    """The intensity-weighted centre of the image's bright pixels, continuous coordinates."""
    g = img.mean(0)
    g = torch.where(g > 0.3, g, torch.zeros_like(g))
    ys, xs = torch.meshgrid(torch.arange(g.shape[0]) + 0.5, torch.arange(g.shape[1]) + 0.5, indexing="ij")
    return np.array([(g * xs).sum() / g.sum(), (g * ys).sum() / g.sum()])


def test_flip_and_rotation_move_the_point_with_the_image():
    from torchvision.transforms import v2

    h, w, x, y = 48, 64, 15, 10
    img = dot_image(h, w, x, y)
    uv = torch.tensor(points.to_units(np.array([[x + 0.5, y + 0.5]]), w, h), dtype=torch.float32)
    assert np.allclose(brightest(img), [x + 0.5, y + 0.5])
    # a known flip and rotation: the dot and the point land on the same pixel
    for tf in (v2.RandomHorizontalFlip(p=1.0), v2.RandomRotation((30, 30)),
               v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.RandomRotation((-25, -25))])):
        out, moved = points.augment_points(img[None], uv, tf)
        got = points.to_pixels(moved[0].numpy(), w, h)
        assert np.abs(got - brightest(out[0])).max() < 0.6, (tf, got, brightest(out[0]))
    flipped = points.augment_points(img[None], uv, v2.RandomHorizontalFlip(p=1.0))[1][0]
    assert points.to_pixels(flipped.numpy(), w, h).tolist() == pytest.approx([w - x - 0.5, y + 0.5])
    # the recipe's own augmentation (flip, rotate, zoom, warp, lighting), seeded: same draws twice
    aug = Augment(flip=True, max_rotate=20.0, max_zoom=1.2, max_warp=0.2, p_affine=1.0,
                  max_lighting=0.2, p_lighting=1.0)
    batch = torch.stack([dot_image(h, w, 20 + 4 * i, 16 + 2 * i) for i in range(6)])
    buv = torch.tensor(points.to_units(np.array([[20.5 + 4 * i, 16.5 + 2 * i] for i in range(6)]), w, h),
                       dtype=torch.float32)

    def run(seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return points.augment_points(batch, buv, points.transforms(aug))
    out, moved = run(3)
    again, moved_again = run(3)
    assert torch.equal(out, again) and torch.equal(moved, moved_again)
    assert not torch.allclose(moved, buv)      # the points did move
    for i in range(6):                          # and each stays on its own dot (warp: within 1.5 px)
        got = points.to_pixels(moved[i].numpy(), w, h)
        assert np.abs(got - brightest(out[i])).max() < 1.5, (i, got, brightest(out[i]))


# ----------------------------------------------------------------------------- the models

def test_soft_argmax_reads_the_hottest_cell_and_the_point_net_shapes():
    from coursepipe.models.points import PointNet, SoftArgmax, cell_centres
    from coursepipe.models.transfer import splitter

    head = SoftArgmax(4)
    with torch.no_grad():
        head.heat.weight.zero_()
        head.heat.weight[0, 0] = 50.0             # channel 0 is the heatmap
    f = torch.zeros(1, 4, 3, 5)
    f[0, 0, 2, 1] = 1.0                           # row 2 of 3, column 1 of 5
    assert head(f)[0].tolist() == pytest.approx([cell_centres(5)[1].item(), cell_centres(3)[2].item()], abs=1e-4)
    for kind in ("softargmax", "pool"):
        net = PointNet("efficientnet_lite0", [0.5] * 3, [0.5] * 3, kind, (16,), 0.5).eval()
        out = net(torch.zeros(2, 3, 48, 64, dtype=torch.uint8))
        assert out.shape == (2, 2) and torch.isfinite(out).all()
        groups = splitter(net)
        assert len(groups) == 3 and sum(map(len, groups)) == len(list(net.parameters()))


def test_config_wants_squish_and_a_known_head():
    for key, value, match in (("resize", "crop", r"model\.resize: points need squish"),
                              ("head", "linear", r"model\.head")):
        with pytest.raises(config.ConfigError, match=rf"recipes\.head_pose\.{match}"):
            cfg_of(tiny_params(**{key: value}))


# ----------------------------------------------------------------------------- the stages

def test_head_pose_stages_end_to_end_then_predict_and_serve_in_pixels(project, ray_session, tmp_path):
    """Every stage audited, fine-tuned from the packaged ImageNet Lite0; predict.py and the web
    API answer in pixels of the image as given (a 2x upscaled frame gets 2x the point)."""
    from coursepipe.serve.models import PAGES, load_script
    from coursepipe.stages import prepare, train
    from coursepipe.validation.suites import init_suite

    write_params(project.root, tiny_params())
    cfg = load_cfg(project, "head_pose")
    init_suite(cfg, HEAD, project)  # the committed suite is baked for the 360-frame default
    fetch(cfg, project)
    done = run_pipeline(cfg, HEAD, project, storage=project.runs(".runs"))
    assert done["prepare"].rows == 48 and done["validate"].success
    assert [h["epoch"] for h in done["train"].history] == [0, 1]
    m = done["evaluate"].metrics
    assert m["n_valid"] == 8 and m["mse"] >= 0 and m["mse_baseline_mean"] > 0
    assert (project.plots("head_pose") / "points.png").read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(project.plots("head_pose") / "predictions.csv")) == 8
    out = done["export"]
    assert out.parity_max_diff <= cfg.export.parity_atol

    bundle = train.load_model(project, HEAD)
    valid = prepare.load(project, "head_pose").query("is_valid").head(2).reset_index(drop=True)
    x, _ = HEAD.kind.tensors(HEAD, bundle.processor, valid)
    with torch.no_grad():
        uv = bundle.model(x).numpy()
    files = []
    for i, data in enumerate(valid["image"]):
        with Image.open(io.BytesIO(data)) as im:
            big = im.resize((im.size[0] * 2, im.size[1] * 2), Image.Resampling.BILINEAR)
        files.append(tmp_path / f"frame{i}.png")
        big.save(files[-1])
    proc = subprocess.run([sys.executable, str(out.path / "predict.py"), *map(str, files)],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    got = pd.read_csv(io.StringIO(proc.stdout))
    assert got["width"].tolist() == [640, 640] and got["height"].tolist() == [480, 480]
    expected = points.to_pixels(uv, [640, 640], [480, 480])
    # the upscaled frame squishes back to nearly the same input: within 2 px of 640
    assert np.abs(got[["x", "y"]].to_numpy() - expected).max() < 2.0

    limits = config.load_serve(project.params)
    card = __import__("json").loads((out.path / "card.json").read_text())
    served = PAGES[card["kind"]]("head_pose", out.path, card, load_script(out.path), limits)
    answer = served.predict([{"image_base64": base64.b64encode(f.read_bytes()).decode(), "name": f.name}
                             for f in files])
    assert [a["name"] for a in answer] == ["frame0.png", "frame1.png"]
    np.testing.assert_allclose([[a["x"], a["y"]] for a in answer], got[["x", "y"]].to_numpy(), atol=1e-3)
    assert [(a["width"], a["height"]) for a in answer] == [(640, 480), (640, 480)]
    assert served.form()["size"] == [64, 48]
    # the web app: the page's form, and the upload route answering in pixels as predict.py does
    from fastapi.testclient import TestClient

    from coursepipe.serve.app import create_app
    client = TestClient(create_app(project.root / "export", limits))
    assert "Find the point" in client.get("/models/head_pose").text
    r = client.post("/api/models/head_pose/images",
                    files=[("files", (f.name, f.read_bytes(), "image/png")) for f in files])
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([[o["x"], o["y"]] for o in r.json()["outputs"]], got[["x", "y"]].to_numpy(), atol=1e-3)
    assert client.post("/api/models/head_pose/images", files=[("files", ("a.jpg", b"text", "image/jpeg"))]).status_code == 415
    # the streaming path (train.data_path: ray_data): BIWI lists a person at a time, the prepared
    # rows are mixed; the driver and the workers hold no frames, Ray Data's tasks decode them as
    # the memory path does, and the same plan trains on them
    from coursepipe.distributed.ray_train import decode_rows
    table = prepare.load(project, "head_pose")
    assert table.loc[~table["is_valid"], "person"].iloc[:8].nunique() > 1
    raw = tiny_params()
    raw["recipes"]["head_pose"]["train"]["data_path"] = "ray_data"
    write_params(project.root, raw)
    scfg = load_cfg(project, "head_pose")
    frame, stream = train.load_frame(scfg, HEAD, project)
    assert "image" not in frame.columns and stream.processor == bundle.processor
    rows, (x, y) = (decode_rows(HEAD, stream.processor, scfg.model, table.head(4)),
                    HEAD.kind.tensors(HEAD, stream.processor, table.head(4)))
    assert np.array_equal(rows["t0"], x.numpy()) and np.array_equal(rows["t1"], y.numpy())
    streamed = train.run(scfg, HEAD, project, storage=project.runs(".runs"), verbose=False)
    assert [h["epoch"] for h in streamed.history] == [0, 1]
    assert all(np.isfinite(h["mse"]) and h["mse"] >= 0 for h in streamed.history)
    assert [(w["split"], w["batches"]) for w in streamed.worker["data_waits"]][:2] == \
        [("train", 40 // 8), ("valid", 1)]          # 40 training frames in batches of 8; 8 scored


def test_a_bad_pose_file_stops_the_prepare_stage_before_training(project, tmp_path):
    from coursepipe.stages import prepare

    files = members(head_pose.synthesize(24, seed=0))
    files["biwi_head_pose/05/frame_00004_pose.txt"] = b"1 0 0\n0 1 0\n"
    archive = tmp_path / "biwi.tgz"
    archive.write_bytes(deterministic_tgz(files))
    raw = tiny_params()
    raw["recipes"]["head_pose"]["sources"]["bad"] = {
        "path": str(archive), "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    raw["recipes"]["head_pose"]["source"] = "bad"
    write_params(project.root, raw)
    cfg = load_cfg(project, "head_pose")
    fetch(cfg, project)
    with pytest.raises(DataError, match=r"biwi_head_pose/05/frame_00004_pose.txt: pose file unparsable"):
        prepare.run(cfg, HEAD, project)
    assert not project.prepared("head_pose").exists() or not any(project.prepared("head_pose").iterdir())
