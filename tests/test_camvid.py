"""camvid (lesson 3): segmentation with a U-Net. Both layouts and their problems named by file,
the paired augmentation (the mask moves with its image), the dynamic U-Net and its encoder
weights, and every stage end to end (audited), through ONNX at another frame size and predict.py's
colour masks."""
from __future__ import annotations

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
from coursepipe.export.portable_segmentation import IGNORE
from coursepipe.models import unet
from coursepipe.models.transfer import WeightsError
from coursepipe.recipes import camvid
from coursepipe.vision.augment import Augment
from coursepipe.vision.paired import augment_pairs, pipeline

CAMVID = recipes.get("camvid")


def tiny_params(rows: int = 30, **model) -> dict:
    raw = small_params(recipes=("camvid",))
    sec = raw["recipes"]["camvid"]
    sec["sources"]["synthetic"]["rows"] = rows
    sec["validate"]["min_rows"] = 10
    sec["model"].update(model)
    sec["train"].update({"epochs": 1, "freeze_epochs": 1, "bs": 8, "num_workers": 1})
    return raw


def cfg_of(raw: dict):
    return config.parse(raw, recipes.Registry()).recipe("camvid")


def png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def extract(blob: bytes, to: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        tf.extractall(to, filter="data")
    return to


def prepared(files: dict[str, bytes], tmp: Path, cfg) -> pd.DataFrame:
    p = cfg.prepare
    return CAMVID.kind.prepare(CAMVID, camvid.normalise(camvid.read_raw(extract(deterministic_tgz(files), tmp), p)), p)


# ----------------------------------------------------------------------------- layouts and problems

def test_fastai_layout_with_valid_txt_names_every_bad_pair(tmp_path):
    cfg = cfg_of(tiny_params())
    codes = ["Road", "Car", "Void"]
    rng = np.random.default_rng(0)
    good = lambda: rng.integers(0, 2, (12, 16))  # noqa: E731  classes 0..1 of 3
    files = {"camvid/codes.txt": "\n".join(codes).encode(), "camvid/valid.txt": b"b.png\nc.png\n"}
    for name in "abcd":
        files[f"camvid/images/{name}.png"] = png(rng.integers(0, 255, (12, 16, 3)), "RGB")
        files[f"camvid/labels/{name}_P.png"] = png(good(), "L")
    files["camvid/images/nomask.png"] = png(rng.integers(0, 255, (12, 16, 3)), "RGB")
    files["camvid/labels/orphan_P.png"] = png(good(), "L")
    files["camvid/labels/d_P.png"] = png(rng.integers(0, 2, (10, 16)), "L")          # wrong size
    files["camvid/images/e.png"] = files["camvid/images/a.png"]
    files["camvid/labels/e_P.png"] = png(np.full((12, 16), 7), "L")                    # outside codes
    df = prepared(files, tmp_path, cfg)
    problems = sorted(p for p in df["problem"] if p)
    assert problems == [
        "camvid/images/nomask.png: has no mask (expected labels/nomask_P.png)",
        "camvid/labels/d_P.png: mask is 16x10, its image camvid/images/d.png is 16x12",
        "camvid/labels/e_P.png: values [7] outside codes.txt's 0..2",
        "camvid/labels/orphan_P.png: mask without an image"]
    assert sorted(df.loc[df["is_valid"], "path"]) == ["camvid/images/b.png", "camvid/images/c.png"]
    assert (df["void"] == 2).all() and df["codes"].iloc[0] == "Road\nCar\nVoid"
    ok = df[df["problem"] == ""]
    assert np.allclose(ok[["share_00", "share_01"]].sum(axis=1), 1.0) and (ok["share_02"] == 0).all()


def test_segnet_layout_split_by_folders_and_its_12_classes(tmp_path):
    cfg = cfg_of(tiny_params())
    rng = np.random.default_rng(1)
    files = {}
    for folder, n in (("train", 3), ("val", 2)):
        for i in range(n):
            files[f"CamVid/{folder}/f{folder}{i}.png"] = png(rng.integers(0, 255, (8, 8, 3)), "RGB")
            files[f"CamVid/{folder}annot/f{folder}{i}.png"] = png(rng.integers(0, 12, (8, 8)), "L")
    df = prepared(files, tmp_path, cfg)
    assert (df["problem"] == "").all() and df["codes"].iloc[0].split("\n") == list(camvid.SEGNET_CODES)
    assert sorted(df.loc[df["is_valid"], "path"]) == ["CamVid/val/fval0.png", "CamVid/val/fval1.png"]
    assert (df["void"] == 11).all()  # Unlabelled
    with pytest.raises(FileNotFoundError, match="neither images/ \\+ labels/"):
        camvid.read_raw(extract(deterministic_tgz({"x/y.txt": b"1"}), tmp_path / "none"), cfg.prepare)


def test_synthetic_sample_is_deterministic_and_in_the_camvid_tiny_layout(tmp_path):
    blob = camvid.synthesize(6, seed=3)
    assert blob == camvid.synthesize(6, seed=3) and blob != camvid.synthesize(6, seed=4)
    cfg = cfg_of(tiny_params())
    df = prepared({m: b for m, b in tarfile_members(blob).items()}, tmp_path, cfg)
    assert len(df) == 6 and (df["problem"] == "").all() and set(df["width"]) == {64}
    shares = df[[f"share_{i:02d}" for i in range(12)]].mean()
    assert shares.iloc[3] > 0.1 and shares.iloc[0] > 0.1  # road and sky dominate, as in CamVid


def tarfile_members(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


# ----------------------------------------------------------------------------- augmentation

COLOURS = np.array([[230, 20, 20], [20, 230, 20], [20, 20, 230], [230, 230, 20]], np.int64)


def coloured_pair(side: int = 64, block: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose colour says its mask's class: blocks of 4 well-separated colours."""
    rng = np.random.default_rng(seed)
    mask = np.kron(rng.integers(0, 4, (side // block, side // block)), np.ones((block, block), np.int64))
    img = COLOURS[mask].transpose(2, 0, 1).astype(np.uint8)
    return torch.from_numpy(img), torch.from_numpy(mask)


def class_of_colour(img: torch.Tensor) -> np.ndarray:
    d = ((img.numpy().transpose(1, 2, 0)[:, :, None, :].astype(np.int64) - COLOURS[None, None]) ** 2).sum(-1)
    return d.argmin(-1)


def test_augmentation_moves_the_mask_with_its_image_nearest_neighbour():
    aug = Augment(flip=True, max_rotate=30.0, max_zoom=1.3, max_translate=0.1, max_warp=0.3, p_affine=1.0,
                  max_lighting=0.2, p_lighting=0.5)
    pairs = [coloured_pair(seed=s) for s in range(4)]
    x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    ax, ay = augment_pairs(x, y, pipeline(aug), seed=7)
    assert ax.dtype == torch.uint8 and ay.dtype == torch.int64 and ay.shape == y.shape
    assert not torch.equal(ay, y)                                  # it did move things
    assert set(ay.unique().tolist()) <= {0, 1, 2, 3, IGNORE}        # nearest: no class in between
    assert (ay == IGNORE).any()                                     # area from outside the frame is not scored
    agree = [(class_of_colour(ax[i]) == ay[i].numpy())[ay[i].numpy() != IGNORE].mean() for i in range(4)]
    assert min(agree) > 0.97, agree                                 # the same geometry for both
    again = augment_pairs(x, y, pipeline(aug), seed=7)
    assert torch.equal(again[0], ax) and torch.equal(again[1], ay)  # seeded: a resumed run replays it
    # the check can fail: masks moved by other draws than their images disagree
    _, other = augment_pairs(x, y, pipeline(aug), seed=8)
    wrong = [(class_of_colour(ax[i]) == other[i].numpy())[other[i].numpy() != IGNORE].mean() for i in range(4)]
    assert min(wrong) < 0.9, wrong


# ----------------------------------------------------------------------------- the model

def test_dynamic_unet_keeps_a_skip_per_resolution_and_segments_any_size():
    for arch, keep in (("efficientnet_lite0", [1, 3, 5, 11]), ("resnet18", [2, 4, 5, 6])):
        torch.manual_seed(0)
        m = unet.DynamicUnet(arch, 5, [0.5] * 3, [0.25] * 3, (64, 48), self_attention=True, blur=True).eval()
        assert m.keep == keep
        with torch.no_grad():
            for h, w in ((48, 64), (37, 53)):  # odd sizes round differently on the way down
                assert m(torch.randint(0, 255, (2, 3, h, w), dtype=torch.uint8)).shape == (2, 5, h, w)
        body, rest = unet.splitter(m)
        assert {id(p) for p in body} == {id(p) for p in m.backbone.parameters()}
        assert len(body) + len(rest) == len(list(m.parameters()))


def test_encoder_weights_load_from_a_file_and_a_wrong_file_is_named(tmp_path):
    src = unet.DynamicUnet("resnet18", 3, [0.5] * 3, [0.25] * 3, (64, 48))
    torch.save({f"{k}": v for k, v in src.backbone.state_dict().items()}, tmp_path / "enc.pt")
    dst = unet.DynamicUnet("resnet18", 3, [0.5] * 3, [0.25] * 3, (64, 48))
    assert unet.load_encoder(dst, tmp_path / "enc.pt", "enc.pt") == len(src.backbone.state_dict())
    assert torch.equal(dst.backbone.conv1.weight, src.backbone.conv1.weight)
    lite = unet.DynamicUnet("efficientnet_lite0", 3, [0.5] * 3, [0.25] * 3, (64, 48))
    with pytest.raises(WeightsError, match="enc.pt: lacks .* encoder tensors"):
        unet.load_encoder(lite, tmp_path / "enc.pt", "enc.pt")


# ----------------------------------------------------------------------------- the stages

def test_a_missing_mask_stops_validation_naming_the_file_and_nothing_trains(project, tmp_path):
    from coursepipe.stages import prepare, train, validate
    from coursepipe.validation.suites import init_suite

    files = tarfile_members(camvid.synthesize(20, seed=0))
    del files["camvid_synthetic/labels/frame_0005_P.png"]
    archive = tmp_path / "bad.tgz"
    archive.write_bytes(deterministic_tgz(files))
    raw = tiny_params()
    raw["recipes"]["camvid"]["sources"]["bad"] = {"path": str(archive),
                                                   "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    raw["recipes"]["camvid"]["source"] = "bad"
    write_params(project.root, raw)
    cfg = load_cfg(project, "camvid")
    init_suite(cfg, CAMVID, project)
    fetch(cfg, project)
    prepare.run(cfg, CAMVID, project)
    with pytest.raises(validate.ValidationFailed, match=r"frame_0005\.png: has no mask"):
        validate.run(cfg, CAMVID, project)
    with pytest.raises(train.NotValidated):
        train.run(cfg, CAMVID, project, storage=str(tmp_path / ".runs"))


def test_camvid_stages_end_to_end_onnx_at_any_size_and_colour_masks(project, ray_session, tmp_path):
    """Every stage audited, fine-tuned from the packaged ImageNet Lite0 encoder."""
    import onnxruntime as ort

    from coursepipe.stages import prepare, train
    from coursepipe.validation.suites import init_suite

    write_params(project.root, tiny_params())
    cfg = load_cfg(project, "camvid")
    init_suite(cfg, CAMVID, project)  # the committed suite wants 20 pairs; the same rules
    fetch(cfg, project)
    done = run_pipeline(cfg, CAMVID, project, storage=project.runs(".runs"))
    assert done["prepare"].rows == 30 and done["validate"].success
    report = pd.read_json(done["validate"].report, typ="series")
    road = next(r for r in report["expectations"]
                if r["column"] == "share_03" and r["type"] == "expect_column_mean_to_be_between")
    assert 0.1 < road["observed_value"] < 0.5                    # the class pixel shares are recorded
    assert [h["epoch"] for h in done["train"].history] == [0, 1]
    m = done["evaluate"].metrics
    assert m["n_valid"] == 6 and 0 <= m["acc_camvid"] <= 1 and "iou_Road" in m and "iou_Unlabelled" not in m
    assert (project.plots("camvid") / "predictions.png").is_file()
    assert (project.plots("camvid") / "confusion_matrix.png").is_file()
    out = done["export"]
    assert out.parity_max_diff <= cfg.export.parity_atol

    bundle = train.load_model(project, CAMVID)
    sess = ort.InferenceSession(str(out.path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 255, (1, 3, 37, 90), dtype=torch.uint8)      # another size than trained
    with torch.no_grad():
        expected = bundle.model(x).numpy()
    got = sess.run(None, {"x": x.numpy()})[0]
    assert got.shape == (1, 12, 37, 90) and np.abs(got - expected).max() < 1e-3

    valid = prepare.load(project, "camvid").query("is_valid").head(2)
    inputs = []
    for i, data in enumerate(valid["image"]):
        inputs.append(tmp_path / f"frame{i}.png")
        inputs[-1].write_bytes(data)
    proc = subprocess.run([sys.executable, str(out.path / "predict.py"), *map(str, inputs), "--out",
                           str(tmp_path / "masks")], capture_output=True, text=True, cwd=tmp_path, check=True)
    table = pd.read_csv(io.StringIO(proc.stdout))
    assert list(table["mask"]) == [str(tmp_path / "masks" / f"frame{i}_mask.png") for i in range(2)]
    assert np.allclose(table.filter(like="share_").sum(axis=1), 1.0, atol=1e-3)  # 4 decimals each
    palette = np.asarray(bundle.processor["palette"])
    xv, _ = CAMVID.kind.tensors(CAMVID, bundle.processor, valid)
    with torch.no_grad():
        pred = bundle.model(xv).argmax(1).numpy()
    for i in range(2):
        colours = np.asarray(Image.open(tmp_path / "masks" / f"frame{i}_mask.png"))
        assert colours.shape == (48, 64, 3) and (colours == palette[pred[i]]).all()


def test_the_served_page_segments_an_upload_into_a_colour_mask(project, tmp_path):
    """The web app over a camvid export (an untrained U-Net: the page, not the model, is tested)."""
    import base64

    from fastapi.testclient import TestClient

    from coursepipe.serve.app import create_app
    from coursepipe.serve.models import load_script
    from coursepipe.stages import export, prepare, train

    write_params(project.root, tiny_params(rows=12))
    cfg = load_cfg(project, "camvid")
    fetch(cfg, project)
    prepare.run(cfg, CAMVID, project)
    frame = prepare.load(project, "camvid")
    processor = CAMVID.kind.fit_processor(CAMVID, frame[~frame["is_valid"]], cfg.model)
    torch.manual_seed(0)
    model = CAMVID.kind.build_model(CAMVID, processor, cfg.model)
    train.save_bundle(project, cfg, model.state_dict(), processor, [{"epoch": 0}], {"run_name": "serve-test"})
    export.run(cfg, CAMVID, project)

    port = load_script(project.export("camvid"))  # the export's own predict.py, as a library
    framed = port.predict_frame(project.export("camvid"), frame.head(2)[["path", "image"]])
    assert list(framed.columns[:2]) == ["path", "mask"] and len(framed) == 2
    assert Image.open(io.BytesIO(framed["mask"].iloc[0])).size == (64, 48)
    assert np.allclose(framed.filter(like="share_").sum(axis=1), 1.0)

    client = TestClient(create_app(project.root / "export", config.load_serve(project.params)))
    page = client.get("/models/camvid")
    assert page.status_code == 200 and "Segment" in page.text and "Unlabelled" in page.text
    frame_png = frame["image"].iloc[0]
    got = client.post("/api/models/camvid/images", files=[("files", ("street.png", frame_png, "image/png"))])
    assert got.status_code == 200, got.text
    (out,) = got.json()["outputs"]
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["mask_png_base64"]))))
    assert out["name"] == "street.png" and mask.shape == (48, 64, 3) and (out["width"], out["height"]) == (64, 48)
    x = torch.from_numpy(np.asarray(Image.open(io.BytesIO(frame_png))).transpose(2, 0, 1).copy())[None]
    with torch.no_grad():
        pred = model.eval()(x).argmax(1)[0].numpy()
    assert (mask == np.asarray(processor["palette"])[pred]).mean() > 0.99
    shares = [t["share"] for t in out["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    bad = client.post("/api/models/camvid/images", files=[("files", ("notes.png", b"hello", "image/png"))])
    assert bad.status_code == 415 and "notes.png" in bad.json()["detail"]


def test_ray_data_streams_decoded_pairs_to_the_workers(project, ray_session, tmp_path):
    """train.data_path: ray_data: the driver holds no image or mask bytes; Ray Data's tasks decode
    the pairs as the memory path would, and the train stage runs on them."""
    from coursepipe.distributed.ray_train import decode_rows
    from coursepipe.stages import prepare, train, validate
    from coursepipe.validation.suites import init_suite

    raw = tiny_params(rows=20)
    raw["recipes"]["camvid"]["train"].update({"data_path": "ray_data", "freeze_epochs": 0, "epochs": 1})
    raw["recipes"]["camvid"]["model"].update({"weights": "none"})
    write_params(project.root, raw)
    cfg = load_cfg(project, "camvid")
    init_suite(cfg, CAMVID, project)
    fetch(cfg, project)
    prepare.run(cfg, CAMVID, project)
    validate.run(cfg, CAMVID, project)
    frame, stream = train.load_frame(cfg, CAMVID, project)
    full = prepare.load(project, "camvid")
    assert not {"image", "mask"} & set(frame.columns) and len(frame) == len(full)
    assert stream.processor == CAMVID.kind.fit_processor(CAMVID, full[~full["is_valid"]], cfg.model)
    out = decode_rows(CAMVID, stream.processor, cfg.model, full.head(5))
    x, y = CAMVID.kind.tensors(CAMVID, stream.processor, full.head(5))
    assert np.array_equal(out["t0"], x.numpy()) and np.array_equal(out["t1"], y.numpy())
    result = train.run(cfg, CAMVID, project, storage=str(tmp_path / ".runs"), verbose=False)
    assert [h["epoch"] for h in result.history] == [0] and 0 <= result.history[0]["acc_camvid"] <= 1
