"""coursepipe.vision: manifest checks, decoding with declared conversions, seeded augmentation,
the image models and the interpretation helpers, on tiny images built here (no Ray, no GX)."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from coursepipe.export import portable_image as port
from coursepipe.models import vision as models
from coursepipe.vision import augment as aug_mod
from coursepipe.vision import images, interpret, manifest
from coursepipe.vision.augment import Augment, augment


def png(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def gray(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


# ----------------------------------------------------------------------------- manifest

def test_inspect_names_empty_and_corrupt_files_and_reads_good_ones():
    good = manifest.inspect_image(png(gray(), "L"), "a/ok.png")
    assert good == {"width": 8, "height": 6, "mode": "L", "decodable": True, "decode_error": ""}
    empty = manifest.inspect_image(b"", "a/empty.png")
    assert not empty["decodable"] and empty["decode_error"] == "a/empty.png: empty file (0 bytes)"
    cut = manifest.inspect_image(png(gray(), "L")[:40], "a/cut.png")  # header fine, data cut short
    assert not cut["decodable"] and cut["decode_error"].startswith("a/cut.png: cannot decode (")
    junk = manifest.inspect_image(b"not an image at all", "a/junk.png")
    assert not junk["decodable"] and "a/junk.png" in junk["decode_error"]


def test_manifest_rows_hash_bytes_and_keep_them(tmp_path):
    (tmp_path / "d" / "3").mkdir(parents=True)
    data = png(gray(), "L")
    (tmp_path / "d" / "3" / "x.png").write_bytes(data)
    (tmp_path / "d" / "3" / "notes.txt").write_text("ignored: not an image suffix")
    files = manifest.image_files(tmp_path)
    df = manifest.manifest([(p, p.parent.name) for p in files], tmp_path)
    assert df["path"].tolist() == ["d/3/x.png"] and df["label"].tolist() == ["3"]
    assert df["image"].iloc[0] == data
    import hashlib
    assert df["sha256"].iloc[0] == hashlib.sha256(data).hexdigest()


def test_cross_split_duplicates_name_every_copy_once_per_group():
    sha = pd.Series(["a", "a", "b", "b", "c"])
    paths = pd.Series(["tr/1.png", "te/9.png", "tr/2.png", "tr/3.png", "te/4.png"])
    valid = pd.Series([False, True, False, False, True])
    out = manifest.cross_split_duplicates(sha, paths, valid)
    # a is in both splits: both rows name both files; b is duplicated inside training only: fine
    assert out.tolist() == ["te/9.png = tr/1.png", "te/9.png = tr/1.png", "", "", ""]


def test_images_per_class_counts_within_each_split():
    label = pd.Series(["1", "1", "2", "1"])
    folder = pd.Series(["training", "training", "training", "testing"])
    assert manifest.images_per_class(label, folder).tolist() == [2, 2, 1, 1]


# ----------------------------------------------------------------------------- decoding

def test_decode_converts_mode_and_size_as_declared():
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 255  # pure red: L = 0.299 * 255
    x = images.decode(png(rgb, "RGB"), "L", (8, 6))
    assert x.shape == (1, 6, 8) and int(x[0, 0, 0]) == 76
    rgba = np.zeros((6, 8, 4), np.uint8)  # fully transparent: composited on white, not black
    assert int(images.decode(png(rgba, "RGBA"), "L", (8, 6)).min()) == 255
    assert images.decode(png(gray(), "L"), "RGB", (4, 4)).shape == (3, 4, 4)      # squish
    assert images.decode(png(gray(), "L"), "L", (4, 4), "crop").shape == (1, 4, 4)
    batch = images.decode_many([png(gray(seed=i), "L") for i in range(3)], "L", (8, 6))
    assert batch.shape == (3, 1, 6, 8) and batch.dtype == np.uint8
    # the export decodes with the very same functions
    state = {"mode": "L", "size": [8, 6], "resize": "squish"}
    np.testing.assert_array_equal(port.preprocess(state, [png(gray(seed=i), "L") for i in range(3)]), batch)


def test_normalisation_choices():
    x = np.stack([np.full((1, 2, 2), 0, np.uint8), np.full((1, 2, 2), 255, np.uint8)])
    mean, std = images.normalisation("data", x)
    assert mean == pytest.approx([0.5]) and std == pytest.approx([0.5])
    assert images.normalisation("none", x) == ([0.0], [1.0])
    rgb = np.zeros((1, 3, 2, 2), np.uint8)
    assert images.normalisation("imagenet", rgb)[0] == list(images.IMAGENET_STATS[0])


# ----------------------------------------------------------------------------- augmentation

def batch(n: int = 4) -> torch.Tensor:
    x = torch.zeros(n, 1, 16, 16, dtype=torch.uint8)
    x[:, :, 4:12, 6:9] = 255  # a vertical bar, off centre horizontally
    return x


def test_inactive_augmentation_only_rescales():
    out = augment(batch(), Augment(), torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.equal(out, batch().float() / 255)


def test_augmentation_is_seeded_and_changes_pixels():
    a = Augment(max_rotate=20, max_zoom=1.2, max_translate=0.1, max_warp=0.2, p_affine=1.0,
                max_lighting=0.4, p_lighting=1.0)
    one = augment(batch(), a, torch.Generator().manual_seed(1))
    again = augment(batch(), a, torch.Generator().manual_seed(1))
    other = augment(batch(), a, torch.Generator().manual_seed(2))
    assert torch.equal(one, again) and not torch.equal(one, other)
    assert not torch.allclose(one, batch().float() / 255) and 0 <= one.min() and one.max() <= 1


def test_flip_mirrors_whole_images_and_p_zero_turns_it_off():
    x = batch(16)
    out = augment(x, Augment(flip=True, p_affine=1.0), torch.Generator().manual_seed(0))
    plain, mirrored = x.float() / 255, (x.float() / 255).flip(-1)
    kinds = [bool(torch.allclose(o, p, atol=1e-5)) for o, p in zip(out, plain)]
    flips = [bool(torch.allclose(o, m, atol=1e-5)) for o, m in zip(out, mirrored)]
    assert all(k or f for k, f in zip(kinds, flips)) and any(kinds) and any(flips)
    off = augment(x, Augment(flip=True, p_affine=0.0), torch.Generator().manual_seed(0))
    assert torch.allclose(off, plain)


def test_augment_callback_touches_training_batches_only():
    cb = aug_mod.AugmentBatch(Augment(max_translate=0.2, p_affine=1.0), seed=3)

    class FakeLearner:  # the three attributes the callback reads
        training, step, xb = True, 5, (batch(),)

    cb.learn = FakeLearner()
    cb.before_batch()
    assert cb.learn.xb[0].dtype == torch.float32
    cb.learn.training, cb.learn.xb = False, (batch(),)
    cb.before_batch()
    assert cb.learn.xb[0].dtype == torch.uint8


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("arch", models.ARCHS)
def test_models_give_logits_and_treat_uint8_as_pixels(arch):
    torch.manual_seed(0)
    m = models.build(arch, 1, 10, (28, 28), [0.13], [0.31], (8, 16, 32, 16), (20,)).eval()
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    out = m(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, m(x.float() / 255))


def test_lesson7_resnet_shape():
    body = models.mnist_resnet(1, 10, (8, 16, 32, 16))
    convs = [mod for mod in body.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert sum(c.stride == (2, 2) for c in convs) == 5 and len(convs) == 13  # 5 conv2 + 4 x 2 in res blocks
    assert isinstance(body[1], models.ResBlock)
    with pytest.raises(ValueError, match="unknown image arch"):
        models.build("vgg", 1, 10, (28, 28), [0], [1], (8,))


# ----------------------------------------------------------------------------- interpretation

def test_most_confused_and_top_losses():
    cm = np.array([[5, 2, 0], [0, 4, 3], [1, 0, 6]])
    assert interpret.most_confused(cm, ["a", "b", "c"]) == [("b", "c", 3), ("a", "b", 2), ("c", "a", 1)]
    assert interpret.most_confused_csv([("b", "c", 3)]) == "actual,predicted,count\nb,c,3\n"
    assert interpret.top_losses(np.array([0.1, 3.0, 0.5, 3.0]), 3).tolist() == [1, 3, 2]
    grid = interpret.plot_top_losses(np.zeros((2, 1, 8, 8), np.uint8), ["1/7 / 2.3 / 0.10", "x"], cols=2)
    assert grid[:4] == b"\x89PNG"


def quadrant_images(n: int, seed: int, side: int = 32):
    """Class 1: a bright square somewhere in the top-left quadrant; class 0: none. Noise on both."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, (n, 1, side, side)).astype(np.uint8)
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = rng.integers(1, side // 2 - 6, 2)
        x[i, 0, r:r + 5, c:c + 5] = 255
    return torch.from_numpy(x), torch.from_numpy(y)


def test_gradcam_mass_lies_where_the_class_evidence_is():
    from coursepipe.vision.gradcam import gradcam, plot_gradcam, upsample

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1, stride=2), torch.nn.ReLU(),   # the last grid: 8 x 8
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x, y = quadrant_images(128, seed=0)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x.float() / 255), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model = torch.nn.Sequential(ScaleBy255(), net).eval()  # uint8 in, as the image models take it
    xt, yt = quadrant_images(40, seed=1)
    positives = xt[yt == 1]
    cams, explained = gradcam(model, positives, classes=[1] * len(positives))
    assert cams.shape == (len(positives), 8, 8) and (explained == 1).all()
    assert cams.min() >= 0 and np.allclose(cams.max((1, 2)), 1.0)
    heat = upsample(cams, (32, 32))
    share = heat[:, :16, :16].sum((1, 2)) / heat.sum((1, 2))
    assert np.median(share) > 0.6, share        # a quarter of the area holds most of the mass
    assert not model.training and all(p.grad is None for p in model.parameters())
    png = plot_gradcam(positives[:3].numpy(), cams[:3], ["a", "b", "c"])
    assert png[:4] == b"\x89PNG"


class ScaleBy255(torch.nn.Module):
    def forward(self, x):
        return x.float() / 255
