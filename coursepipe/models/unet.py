"""fastai's dynamic U-Net (lesson 3) over any encoder of the zoo: EfficientNet-Lite0 or a ResNet.

    x (B, 3, H, W) uint8 or 0..1 -> ImageInput (normalise) -> encoder stages, the last output of
    every resolution kept (the skip connections) -> BN, ReLU, middle convs (ni -> 2ni -> ni)
    -> one UnetBlock per kept output, deepest first: PixelShuffle_ICNR x2 (+ blur), resized to the
    skip's grid, concat with BN(skip), ReLU, two convs (+ self-attention on the third-last)
    -> PixelShuffle_ICNR to the input's grid, concat the (normalised) input (last_cross), ResBlock
    -> 1x1 conv to n_classes: logits (B, n_classes, H, W).

As fastai's DynamicUnet, the skips are found, not named: a dummy forward at construction records
each encoder stage's output size, and the last stage before every change of size is kept. fastai
keeps them with forward hooks; here the encoder's stages run in a loop that keeps those outputs
itself, which is the same computation without hook state (nothing to remove, DDP- and
ONNX-export-friendly). Decoder convs have no BatchNorm by default, as fastai's (norm_type=None);
`decoder_bn` adds it.

Encoders keep their library's module names under `backbone`, so the ImageNet files load as they
are (coursepipe/models/transfer.py resolves and verifies them). EfficientNet-Lite0's encoder
stops after its last MBConv block (320 channels at stride 32): its 1x1 `_conv_head` to 1280
channels belongs to the classifier, and a middle conv on 1280 channels would hold 59M weights.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coursepipe.learn.loop import Callback
from coursepipe.models.transfer import ARCHS, BODY_LAYERS, WeightsError, backbone_state, resolve
from coursepipe.models.vision import ImageInput

LITE_ENCODER = ("_conv_stem", "_bn0", "_blocks")   # EfficientNet-Lite without its head conv


# ----------------------------------------------------------------------------- encoders

class LiteEncoder(nn.Module):
    """EfficientNet-Lite's stem and 16 MBConv blocks (efficientnet_lite_pytorch's names, so the
    ImageNet state_dict loads into it), run as a list of stages: the stem, then each block."""

    def __init__(self, name: str):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(name)
        for layer in LITE_ENCODER:
            setattr(self, layer, getattr(net, layer))
        self.act = nn.ReLU6()
        self.drop_connect = net._global_params.drop_connect_rate or 0.0

    def stages(self) -> list:
        n = len(self._blocks)

        def stem(x):
            return self.act(self._bn0(self._conv_stem(x)))

        def block(i):  # drop connect grows with depth, as the package does
            return lambda x: self._blocks[i](x, drop_connect_rate=self.drop_connect * i / n)
        return [stem, *(block(i) for i in range(n))]


def encoder(arch: str) -> nn.Module:
    """A randomly initialised encoder for `arch` (the zoo of models/transfer.py)."""
    import torchvision

    if arch not in ARCHS:
        raise ValueError(f"unknown encoder arch {arch!r}; expected one of {list(ARCHS)}")
    if arch.startswith("efficientnet"):
        return LiteEncoder(ARCHS[arch][0])
    net = getattr(torchvision.models, ARCHS[arch][0])(weights=None)
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in BODY_LAYERS))


def encoder_stages(enc: nn.Module) -> list:
    """The encoder as an ordered list of callables, each one stage (a layer or a block)."""
    return enc.stages() if isinstance(enc, LiteEncoder) else list(enc.children())


def run_encoder(stages: list, keep: Sequence[int], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the last stage's output, the outputs of stages `keep`, in order)."""
    kept = []
    for i, stage in enumerate(stages):
        x = stage(x)
        if i in keep:
            kept.append(x)
    return x, kept


def size_changes(sizes: list[tuple[int, int]]) -> list[int]:
    """Indices of the stages whose output is the last at its resolution (fastai's
    _get_sz_change_idxs): stage i where stage i+1's grid differs."""
    return [i for i in range(len(sizes) - 1) if sizes[i] != sizes[i + 1]]


# ----------------------------------------------------------------------------- decoder parts

def conv_layer(ni: int, nf: int, ks: int = 3, bn: bool = False, act: bool = True) -> nn.Sequential:
    """fastai v2's ConvLayer: conv (bias only without BN), [BN], [ReLU]."""
    layers: list[nn.Module] = [nn.Conv2d(ni, nf, ks, padding=ks // 2, bias=not bn)]
    nn.init.kaiming_normal_(layers[0].weight)
    if bn:
        layers.append(nn.BatchNorm2d(nf))
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def icnr_(weight: torch.Tensor, scale: int = 2) -> torch.Tensor:
    """ICNR init (Aitken et al. 2017): every sub-pixel of a PixelShuffle output starts with the
    same kernel, so the upsampling starts as nearest-neighbour and has no checkerboard."""
    ni, nf, h, w = weight.shape
    sub = nn.init.kaiming_normal_(weight.new_zeros(ni // scale ** 2, nf, h, w))
    with torch.no_grad():
        weight.copy_(sub.repeat_interleave(scale ** 2, dim=0))
    return weight


class PixelShuffleICNR(nn.Module):
    """Upsample x2: 1x1 conv to nf * 4 channels (ICNR init), ReLU, PixelShuffle; optional blur
    (replication pad + 2x2 average, stride 1) against checkerboard artefacts, as fastai."""

    def __init__(self, ni: int, nf: int, blur: bool = False, bn: bool = False):
        super().__init__()
        self.conv = conv_layer(ni, nf * 4, ks=1, bn=bn)
        icnr_(self.conv[0].weight)
        self.shuf = nn.PixelShuffle(2)
        self.blur = nn.Sequential(nn.ReplicationPad2d((1, 0, 1, 0)), nn.AvgPool2d(2, stride=1)) \
            if blur else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blur(self.shuf(self.conv(x)))


class SelfAttention(nn.Module):
    """SAGAN self-attention over the grid; gamma starts at 0, so the block starts as identity.
    Plain 1x1 convs (fastai adds spectral norm; its power-iteration buffers would change in eval
    exports and matter for GAN critics, not for a segmentation decoder)."""

    def __init__(self, n: int):
        super().__init__()
        self.query, self.key = nn.Conv1d(n, max(n // 8, 1), 1), nn.Conv1d(n, max(n // 8, 1), 1)
        self.value = nn.Conv1d(n, n, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        flat = x.flatten(2)                                                   # (B, C, HW)
        f, g, v = self.query(flat), self.key(flat), self.value(flat)
        beta = torch.softmax(f.transpose(1, 2) @ g, dim=1)                    # (B, HW, HW)
        return (self.gamma * (v @ beta) + flat).view(b, c, h, w)


class UnetBlock(nn.Module):
    """Upsample the deeper features, resize to the skip's grid, concat BN(skip), two convs."""

    def __init__(self, up_in: int, skip_in: int, final_div: bool = True, blur: bool = False,
                 self_attention: bool = False, bn: bool = False):
        super().__init__()
        self.shuf = PixelShuffleICNR(up_in, up_in // 2, blur=blur, bn=bn)
        self.bn = nn.BatchNorm2d(skip_in)
        ni = up_in // 2 + skip_in
        nf = ni if final_div else ni // 2
        self.conv1 = conv_layer(ni, nf, bn=bn)
        self.conv2 = conv_layer(nf, nf, bn=bn)
        self.attn = SelfAttention(nf) if self_attention else nn.Identity()

    def forward(self, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = self.shuf(up)
        # always resize (a no-op when the grids agree): a branch on the shape would be a guard
        # that a dynamic-size ONNX export cannot keep; odd sizes round differently on the way down
        up = F.interpolate(up, size=skip.shape[-2:], mode="nearest")
        x = F.relu(torch.cat([up, self.bn(skip)], dim=1))
        return self.attn(self.conv2(self.conv1(x)))


class ResBlock(nn.Module):
    """fastai's ResBlock(1, ni, nf): two 3x3 convs (no activation after the second) plus the
    input (1x1 conv when widths differ), then ReLU."""

    def __init__(self, ni: int, nf: int, bn: bool = False):
        super().__init__()
        self.convs = nn.Sequential(conv_layer(ni, nf, bn=bn), conv_layer(nf, nf, bn=bn, act=False))
        self.idconv = nn.Identity() if ni == nf else conv_layer(ni, nf, ks=1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.convs(x) + self.idconv(x))


# ----------------------------------------------------------------------------- the model

class DynamicUnet(nn.Module):
    """ImageInput -> encoder (skips kept) -> middle -> UnetBlocks -> full-size logits.
    forward(x) takes the one image tensor the export names `x`; any H and W work."""

    def __init__(self, arch: str, n_classes: int, mean, std, size: tuple[int, int] = (128, 96),
                 blur: bool = False, blur_final: bool = True, self_attention: bool = False,
                 last_cross: bool = True, bottle: bool = False, decoder_bn: bool = False):
        super().__init__()
        self.arch, self.last_cross = arch, last_cross
        self.stem = ImageInput(mean, std)
        self.backbone = encoder(arch)
        stages = encoder_stages(self.backbone)
        w, h = size
        with torch.no_grad():  # the dummy pass of fastai's model_sizes, at the declared size
            was = self.backbone.training
            self.backbone.eval()
            x, sizes, chans = torch.zeros(1, 3, h, w), [], []
            for stage in stages:
                x = stage(x)
                sizes.append(tuple(x.shape[-2:]))
                chans.append(x.shape[1])
            self.backbone.train(was)
        self.keep = size_changes(sizes)
        if not self.keep:
            raise ValueError(f"encoder {arch} never changes the grid of a {w}x{h} input: no skips")
        ni = chans[-1]
        self.middle = nn.Sequential(nn.BatchNorm2d(ni), nn.ReLU(),
                                    conv_layer(ni, ni * 2, bn=decoder_bn), conv_layer(ni * 2, ni, bn=decoder_bn))
        blocks = []
        for n, i in enumerate(reversed(self.keep)):
            last = n == len(self.keep) - 1
            block = UnetBlock(ni, chans[i], final_div=not last, blur=blur and (not last or blur_final),
                              self_attention=self_attention and n == len(self.keep) - 3, bn=decoder_bn)
            blocks.append(block)
            ni = block.conv2[0].out_channels
        self.blocks = nn.ModuleList(blocks)
        self.final_shuf = PixelShuffleICNR(ni, ni, bn=decoder_bn)
        cat = ni + 3 if last_cross else ni
        self.res = ResBlock(cat, ni // 2 if bottle else cat, bn=decoder_bn)
        self.head = nn.Conv2d(ni // 2 if bottle else cat, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)                                                      # (B, 3, H, W)
        out, skips = run_encoder(encoder_stages(self.backbone), self.keep, x)
        y = self.middle(out)
        for block, skip in zip(self.blocks, reversed(skips)):
            y = block(y, skip)
        y = F.interpolate(self.final_shuf(y), size=x.shape[-2:], mode="nearest")   # fastai's ResizeToOrig
        if self.last_cross:
            y = torch.cat([y, x], dim=1)
        return self.head(self.res(y))                                         # (B, n_classes, H, W)


def splitter(model: DynamicUnet) -> list[list[nn.Parameter]]:
    """fastai's unet split: [encoder, everything after it]; freeze_to(-1) trains the decoder."""
    body = {id(p) for p in model.backbone.parameters()}
    return [list(model.backbone.parameters()), [p for p in model.parameters() if id(p) not in body]]


# ----------------------------------------------------------------------------- weights

def load_encoder(model: DynamicUnet, path, source: str) -> int:
    """Copy an ImageNet file's (or a trained model's) encoder tensors into model.backbone.

    The file's extra tensors (a classifier's head, Lite0's _conv_head) are left out; a tensor
    the encoder needs and the file lacks, or one of the wrong shape, is an error naming the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of many types
        raise WeightsError(f"weights {source}: cannot read {path} ({e})") from None
    own = model.backbone.state_dict()
    layers = LITE_ENCODER if isinstance(model.backbone, LiteEncoder) else BODY_LAYERS
    state = {k: v for k, v in backbone_state(obj, source, layers).items() if k in own}
    missing = sorted(set(own) - set(state))
    if missing:
        raise WeightsError(f"weights {source}: lacks {len(missing)} encoder tensors, e.g. {missing[:3]} "
                           f"(another arch?)")
    try:
        model.backbone.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise WeightsError(f"weights {source}: does not fit this encoder ({detail}; another arch?)") from None
    return len(state)


class LoadEncoder(Callback):
    """Before the first phase of a fresh run, load the declared encoder weights on every rank
    (models/transfer.py's LoadPretrained, for the U-Net's encoder: a resumed run keeps its own)."""
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
            load_encoder(getattr(learn.model, "module", learn.model), path, self.weights)
