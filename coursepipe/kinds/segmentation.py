"""Segmentation (lesson 3, CamVid): a class per pixel, from an image and its mask.

The prepared table has one row per (image, mask) pair with both files' bytes (`image`, `mask`:
PNG, so workers need no file access), codes.txt as a column (`codes`, one class per line: the
same on every row) and the void class's index (`void`, -1 if none), and the checks of the pair:
  problem     '' or why the pair cannot be trained on, naming the file: an image without a mask,
              a mask without an image, an undecodable file, a mask of another size than its
              image, mask values outside codes.txt. The suite fails on any (the message quotes
              them) before training starts.
  share_NN    the share of the mask's pixels in class NN (0 for NN >= the number of codes): the
              suite records each one's mean over the table (the class pixel shares) in the report.
Model: fastai's dynamic U-Net over an encoder of the zoo (coursepipe/models/unet.py). Void
pixels (and the area augmentation brings in from outside the frame) are IGNORE: the loss skips
them and `acc_camvid` (the course's metric) does not count them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from coursepipe.config import ConfigError, Evaluate, Prepare, Section, positive
from coursepipe.contract import Evaluation, Kind, Spec
from coursepipe.export.portable_segmentation import IGNORE
from coursepipe.vision.augment import Augment

TARGET = "mask"
MAX_CODES = 32                          # fastai's CAMVID has 32 classes, SegNet's 12: share_00 .. share_31
SHARES = tuple(f"share_{i:02d}" for i in range(MAX_CODES))
COLUMNS = ("path", "mask_path", "width", "height", "mode", "sha256", "codes", "void", "problem",
           *SHARES, "image", "mask")
# share_NN get only the kind's mean rule: prepare computes them (in [0, 1] by construction), and
# a type and a range rule for each of 32 columns would double validate's time
RANGES = {"void": (-1, MAX_CODES - 1)}
PREDICTIONS_PNG = "predictions.png"
CONFUSION_PNG = "confusion_matrix.png"


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class SegPrepare(Prepare):
    void_codes: tuple[str, ...]         # names of the void class in codes.txt (first found is void)


@dataclass(frozen=True)
class SegEvaluate(Evaluate):
    show: int                           # validation frames in predictions.png (image / truth / prediction)

    def __post_init__(self):
        super().__post_init__()
        positive(self, "show")


@dataclass(frozen=True)
class UnetModel(Section):
    """fastai's unet_learner: an encoder of the zoo, pretrained or not, and the decoder's options."""
    arch: str                           # efficientnet_lite0 | resnet18 | resnet34 | resnet50
    weights: str                        # none | package (installed ImageNet file) | http(s)/file URL | local file
    weights_cache: str                  # downloaded weight files, kept once verified
    weights_timeout_s: float            # a download stalling this long fails
    size: tuple[int, int]               # width, height fed to the model (masks resized nearest)
    resize: Literal["squish", "crop"]   # for frames of another aspect: stretch, or short side + centre crop
    normalize: Literal["imagenet", "lite", "none"]
    augment: Augment                    # applied to image and mask together (vision/paired.py)
    blur: bool                          # fastai: blur after every PixelShuffle upsampling
    blur_final: bool                    #   ... including the last UnetBlock's
    self_attention: bool                # SAGAN self-attention in the third-last UnetBlock
    last_cross: bool                    # concat the input before the last ResBlock
    bottle: bool                        # halve the last ResBlock's width
    decoder_bn: bool                    # BatchNorm in the decoder's convs (fastai: none)
    weights_sha256: str | None = None   # URL: None takes torchvision's hash prefix in the file name

    def __post_init__(self):
        from coursepipe.models.transfer import ARCHS
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: {self.arch!r} is not one of {list(ARCHS)}")
        if min(self.size) < 32:
            raise ConfigError(f"size must be at least 32 x 32 (the encoder halves it 5 times), got {list(self.size)}")


# ----------------------------------------------------------------------------- the table

def usable(df: pd.DataFrame) -> pd.DataFrame:
    """The pairs with no problem."""
    return df[df["problem"] == ""]


def codes_of(df: pd.DataFrame) -> list[str]:
    """codes.txt's classes, as prepare stored them (one codes.txt per table)."""
    values = df["codes"].unique()
    if len(values) != 1:
        raise ValueError(f"the table holds {len(values)} different codes.txt; expected one")
    return str(values[0]).split("\n")


def void_index(codes: list[str], void_codes: tuple[str, ...]) -> int:
    return next((codes.index(c) for c in void_codes if c in codes), -1)


def check_pairs(df: pd.DataFrame, n_codes: int) -> pd.DataFrame:
    """problem, size, mode and class shares of every pair."""
    import io

    from PIL import Image

    from coursepipe.vision.masks import pair_problem, pixel_shares

    out = df.copy()
    shares = np.zeros((len(out), MAX_CODES))
    problems, widths, heights, modes = [], [], [], []
    for i, row in enumerate(out.itertuples(index=False)):
        problem, counts = pair_problem(row.path, row.mask_path, row.image, row.mask, n_codes)
        problems.append(row.problem or problem)   # the layout's own message says which file to expect
        if counts is not None:
            shares[i, :n_codes] = pixel_shares(counts)
        try:
            with Image.open(io.BytesIO(row.image)) as im:
                (w, h), mode = im.size, im.mode
        except Exception:
            w, h, mode = 0, 0, ""
        widths.append(w), heights.append(h), modes.append(mode)
    out["problem"], out["width"], out["height"], out["mode"] = problems, widths, heights, modes
    for j, name in enumerate(SHARES):
        out[name] = shares[:, j]
    return out.astype({"width": "int64", "height": "int64"})


def masks_tensor(processor: dict, df: pd.DataFrame):
    """int64 (N, H, W) class indices at the model's size, void as IGNORE."""
    import torch

    from coursepipe.vision.masks import decode_masks
    return torch.from_numpy(decode_masks(df["mask"], tuple(processor["size"]), processor["void"],
                                         processor["resize"]))


def images_tensor(processor: dict, df: pd.DataFrame):
    import torch

    from coursepipe.export.portable_segmentation import decode_many
    return torch.from_numpy(decode_many(df["image"], tuple(processor["size"]), processor["resize"]))


def acc_camvid(logits, y):
    """The course's metric: pixel accuracy over the pixels that are not void, as (sum, count)."""
    import torch

    keep = y != IGNORE
    hit = (logits.argmax(1) == y) & keep
    return hit.sum().double(), keep.sum().to(torch.float64)


# ----------------------------------------------------------------------------- the kind

class Segmentation(Kind):
    name = "segmentation"
    portable = "coursepipe.export.portable_segmentation"
    model_configs = (UnetModel,)
    prepare_config = SegPrepare
    evaluate_config = SegEvaluate

    def prepare(self, recipe, df, p: SegPrepare):
        """codes and void, the pair checks, then the split (the recipe's fixed one, else a seeded
        random valid_pct of the good pairs; pairs with a problem stay on the training side, where
        validation stops them)."""
        from coursepipe.data.split import split_mask

        codes = codes_of(df)
        if len(codes) > MAX_CODES:
            raise ValueError(f"prepare@{recipe.name}: codes.txt lists {len(codes)} classes; the "
                             f"segmentation kind records at most {MAX_CODES}")
        out = check_pairs(df, len(codes))
        out["void"] = void_index(codes, p.void_codes)
        bad = (out["problem"] != "").to_numpy()
        keep = np.flatnonzero(~bad)
        fixed = recipe.split(out, p) if recipe.split is not None else None
        if fixed is not None:
            mask = np.asarray(fixed, dtype=bool) & ~bad
        else:
            mask = np.zeros(len(out), dtype=bool)
            if len(keep):
                mask[keep[split_mask(len(keep), p.valid_pct, p.seed)]] = True
        out["is_valid"] = mask
        if bad.any():
            print(f"prepare@{recipe.name}: {int(bad.sum())} of {len(out)} pairs have a problem "
                  f"(validation will stop on them): {'; '.join(out.loc[bad, 'problem'].head(10))}")
        return out

    def expectations(self, recipe, v) -> list[Spec]:
        """No pair with a problem (the message quotes the files); each class's mean pixel share
        is recorded (observed_value in the report; any share passes)."""
        return [("expect_column_values_to_be_in_set", {"column": "problem", "value_set": [""]}),
                *(("expect_column_mean_to_be_between", {"column": s, "min_value": 0.0, "max_value": 1.0})
                  for s in SHARES)]

    def prefetch(self, m: UnetModel) -> None:
        """Fetch and hash-check the encoder's weights on the driver, before Ray starts."""
        from coursepipe.models.transfer import resolve
        resolve(m.weights, m.weights_cache, m.weights_sha256, m.weights_timeout_s, m.arch)

    def fit_processor(self, recipe, train, m: UnetModel) -> dict:
        from coursepipe.vision.images import normalisation
        from coursepipe.vision.masks import palette

        codes = codes_of(train)
        void = int(train["void"].iloc[0])
        mean, std = normalisation(m.normalize, np.zeros((1, 3, 1, 1), np.uint8))
        return {"classes": codes, "void": void, "mode": "RGB", "size": list(m.size), "resize": m.resize,
                "normalize": m.normalize, "mean": mean, "std": std, "target": TARGET,
                "palette": palette(codes, void)}

    def tensors(self, recipe, processor: dict, df) -> tuple:
        """(x uint8 (N, 3, H, W), y int64 (N, H, W)) for the usable rows."""
        df = usable(df)
        return images_tensor(processor, df), masks_tensor(processor, df)

    def build_model(self, recipe, processor: dict, m: UnetModel):
        from coursepipe.models.unet import DynamicUnet
        return DynamicUnet(m.arch, len(processor["classes"]), processor["mean"], processor["std"],
                           tuple(m.size), blur=m.blur, blur_final=m.blur_final,
                           self_attention=m.self_attention, last_cross=m.last_cross, bottle=m.bottle,
                           decoder_bn=m.decoder_bn)

    def splitter(self, m, model) -> list[list]:
        from coursepipe.models.unet import splitter
        return splitter(model)

    def loss_func(self, m):
        import torch
        return torch.nn.CrossEntropyLoss(ignore_index=IGNORE)

    def metrics(self, m) -> dict:
        return {"acc_camvid": acc_camvid}

    def callbacks(self, recipe, m: UnetModel, t) -> list:
        """Encoder weights (fresh runs), then paired augmentation."""
        from coursepipe.vision.paired import AugmentPairs

        cbs: list = []
        if m.weights not in ("", "none"):
            from coursepipe.models.unet import LoadEncoder
            cbs.append(LoadEncoder(m.weights, m.weights_cache, m.weights_sha256, m.weights_timeout_s, m.arch))
        if m.augment.active:
            cbs.append(AugmentPairs(m.augment, t.seed))
        return cbs

    def heavy_columns(self, m) -> tuple[str, ...]:
        return ("image", "mask")           # encoded bytes: decoded in Ray Data's tasks (data_path: ray_data)

    def usable(self, df):
        return usable(df)

    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """acc_camvid, per-class IoU (torchmetrics), a pixel confusion matrix over the classes
        (void left out) and image / truth / prediction for the first `show` frames."""
        import torch
        from torchmetrics.classification import MulticlassConfusionMatrix, MulticlassJaccardIndex

        from coursepipe.io import write_bytes
        from coursepipe.learn.infer import mean_loss, predict_logits
        from coursepipe.learn.interpret import plot_confusion
        from coursepipe.vision.masks import plot_predictions

        valid = usable(run.valid).reset_index(drop=True)
        classes, void = list(run.processor["classes"]), int(run.processor["void"])
        x, y = self.tensors(run.recipe, run.processor, valid)
        logits = predict_logits(run.model, (x,), run.config.bs)
        pred = logits.argmax(1)
        n = len(classes)
        hit, count = acc_camvid(logits, y)
        iou = MulticlassJaccardIndex(num_classes=n, average=None, ignore_index=IGNORE, zero_division=0)(pred, y)
        cm = MulticlassConfusionMatrix(num_classes=n, ignore_index=IGNORE)(pred, y).numpy()
        scored = [i for i in range(n) if i != void]
        present = [i for i in scored if cm[i].sum() > 0]   # classes in the validation truth
        metrics = {"n_valid": len(valid), "n_pixels": int(count), "acc_camvid": float(hit / count.clamp(min=1)),
                   "valid_loss": mean_loss(self.loss_func(run.model_config), logits, y, run.config.bs),
                   "mean_iou": float(iou[present].mean()) if present else 0.0}
        metrics.update({f"iou_{classes[i]}": float(iou[i]) for i in scored})
        sub = cm[np.ix_(scored, scored)]
        rows = sub.sum(1, keepdims=True)
        percent = np.where(rows > 0, np.round(100 * sub / np.maximum(rows, 1)), 0).astype(np.int64)
        write_bytes(run.plots / CONFUSION_PNG, plot_confusion(
            percent, [classes[i] for i in scored],
            title=f"{run.name}: pixels, % of each actual class (n={int(count):,})"))
        k = min(run.config.show, len(valid))
        titles = [Path(p).name for p in valid["path"].head(k)]
        write_bytes(run.plots / PREDICTIONS_PNG, plot_predictions(
            x[:k].numpy(), y[:k].numpy(), pred[:k].numpy(), np.asarray(run.processor["palette"]), titles))
        return metrics, run.plots / CONFUSION_PNG

    def export_axes(self, names: list[str]) -> dict[str, dict[int, str]]:
        """Batch, height and width are dynamic: the graph segments frames of any size."""
        return {n: {0: "batch", 2: "height", 3: "width"} for n in names}

    def card(self, recipe, processor: dict) -> dict:
        void = processor["void"]
        return {"target": TARGET, "classes": list(processor["classes"]),
                "void": processor["classes"][void] if void >= 0 else None,
                "input": {"size": processor["size"], "resize": processor["resize"]}}
