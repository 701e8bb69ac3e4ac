"""EfficientNet-Lite0 from the pinned wheel: verified file, every tensor loaded, features that
transfer, fastai's head / splitter / freezing, and the Lite input scaling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from coursepipe import config, recipes
from coursepipe.learn.fine_tune import freeze_to
from coursepipe.models import transfer
from coursepipe.vision.images import normalisation

ARCH = "efficientnet_lite0"
LITE = normalisation("lite", np.zeros((1, 3, 1, 1), np.uint8))


def lite_net(n_classes: int = 2) -> transfer.TransferNet:
    torch.manual_seed(0)
    return transfer.TransferNet(ARCH, n_classes, *LITE, lin_ftrs=(16,), ps=0.5)


def test_the_packaged_file_is_hash_checked_and_a_wrong_one_refused_by_name(tmp_path, monkeypatch):
    path = transfer.packaged(ARCH)
    assert path.name == "efficientnet-lite0-57934424.pth"
    assert transfer.resolve("package", str(tmp_path), None, 1.0, ARCH) == path
    monkeypatch.setitem(transfer.PACKAGED, ARCH, "0" * 64)  # as if the installed file were another
    with pytest.raises(transfer.WeightsError, match=r"efficientnet-lite0-57934424.pth.*does not match.*refusing"):
        transfer.packaged(ARCH)
    with pytest.raises(transfer.WeightsError, match="no installed weight file for arch 'resnet34'"):
        transfer.resolve("package", str(tmp_path), None, 1.0, "resnet34")


def test_every_tensor_of_the_checkpoint_lands_in_the_body():
    net = lite_net()
    sd = torch.load(transfer.packaged(ARCH), map_location="cpu", weights_only=True)
    body_keys = set(net.backbone.state_dict())
    file_body = {k for k in sd if k.split(".")[0] in transfer.LITE_LAYERS}
    assert file_body == body_keys                         # none missing, none unexpected
    assert set(sd) - file_body == {"_fc.weight", "_fc.bias"}  # only the ImageNet classifier stays out
    assert transfer.load_backbone(net, transfer.packaged(ARCH), "package") == len(body_keys)
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, sd[k]), k


def textures(n: int, seed: int, side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Two texture classes with the same colours and noise: oriented stripes vs checks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    xs, ys = [], []
    for i in range(n):
        f, phase = rng.uniform(0.15, 0.35), rng.uniform(0, 2 * np.pi)
        if i % 2 == 0:
            a = rng.uniform(0, np.pi)
            g = np.sin(f * (np.cos(a) * xx + np.sin(a) * yy) + phase)
        else:
            g = np.sin(f * xx + phase) * np.sin(f * yy + rng.uniform(0, 2 * np.pi))
        g = g + rng.normal(0, 0.3, g.shape)
        img = np.clip(127 + 100 * g[..., None] * rng.uniform(0.3, 1.0, 3), 0, 255).astype(np.uint8)
        xs.append(img.transpose(2, 0, 1))
        ys.append(i % 2)
    return torch.tensor(np.stack(xs)), torch.tensor(ys)


def probe_accuracy(net, train, test) -> float:
    """A logistic-regression probe on the frozen body's pooled features."""
    def feats(x):
        with torch.no_grad():
            return net.backbone(net.stem(x)).mean((2, 3))
    ftr, fte = feats(train[0]), feats(test[0])
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    w = torch.zeros(ftr.shape[1], 2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ftr @ w + b, train[1]) + 1e-2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return ((fte @ w + b).argmax(1) == test[1]).float().mean().item()


def test_pretrained_features_beat_random_ones_on_a_linear_probe():
    torch.set_num_threads(1)
    train, test = textures(20, seed=0), textures(60, seed=1)
    random_net = lite_net().eval()
    pretrained = lite_net().eval()
    transfer.load_backbone(pretrained, transfer.packaged(ARCH), "package")
    got, baseline = probe_accuracy(pretrained, train, test), probe_accuracy(random_net, train, test)
    assert got >= 0.9 and got > baseline + 0.1, (got, baseline)


def test_head_splitter_freezing_and_input_scaling():
    net = lite_net(5)
    groups = transfer.splitter(net)
    assert len(groups) == 3
    ids = [set(map(id, g)) for g in groups]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    assert set().union(*ids) == {id(p) for p in net.parameters()}     # every parameter, once
    assert ids[2] == {id(p) for p in net.head.parameters()}
    assert {id(p) for p in net.backbone._conv_stem.parameters()} <= ids[0]
    assert {id(p) for p in net.backbone._conv_head.parameters()} <= ids[1]
    # fastai's head: concat pool (2 x 1280), BN, dropout, linear 16, ReLU, BN, dropout, linear 5
    assert isinstance(net.head[0], transfer.AdaptiveConcatPool2d) and net.head[2].num_features == 2560
    assert net.head[-1].out_features == 5

    freeze_to(net, groups, -1)                                   # fine_tune's frozen phase
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    bn = {id(p) for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
          for p in m.parameters()}
    assert trainable == ids[2] | bn                              # head + every BN (fastai train_bn)
    freeze_to(net, groups, 0)
    assert all(p.requires_grad for p in net.parameters())

    # (x - 127) / 128 on 0..255 pixels, applied inside the model (and so inside the export)
    scaled = net.stem(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8))
    assert torch.allclose(scaled, torch.ones_like(scaled), atol=1e-6)
    zero = net.stem(torch.full((1, 3, 1, 1), 127, dtype=torch.uint8))
    assert torch.allclose(zero, torch.zeros_like(zero), atol=1e-6)


def test_pets_and_own_images_default_to_the_packaged_backbone():
    from conftest import small_params

    for name in ("pets", "own_images"):
        raw = small_params(recipes=(name,))
        m = config.parse(raw, recipes.Registry()).recipe(name).model
        assert (m.arch, m.weights, m.normalize) == (ARCH, "package", "lite")
