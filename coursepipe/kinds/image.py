"""Image classification (lessons 1, 2, 6, 7): one label per image file.

The prepared table is the image manifest (coursepipe/vision/manifest.py: one row per file with its
size, mode, hash and bytes) plus three columns this kind fills in at prepare:
  excluded      '' or why the file is not used (unreadable, too small, no label), naming the file;
                with `prepare.bad_images: exclude` such files are listed and never trained on,
                with `error` prepare stops and names them (lesson 2's verify_images, made explicit)
  duplicate     '' or 'a.png = b.png' when copies of one file sit on both sides of the split
  class_images  training images of the row's class (the suite's min_per_class rule reads it)
Models: a net trained from scratch (`ScratchNet`: lesson 7's ResNet, a simple CNN, lesson 5's
linear nets) or a pretrained backbone with fastai's head (`PretrainedNet`: torchvision ResNets).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from coursepipe.config import ConfigError, Evaluate, Prepare, Section, Validate, positive
from coursepipe.contract import Evaluation, Kind, Spec
from coursepipe.data.split import seeded_order
from coursepipe.vision.augment import Augment

TARGET = "label"
POLICY_COLUMNS = ("excluded", "duplicate", "class_images")
MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16")  # source modes that convert
OK = 'excluded==""'                     # GX row condition: the rows the policy keeps
TOP_LOSSES_PNG = "top_losses.png"
GRADCAM_PNG = "gradcam.png"
CONFUSED_CSV = "most_confused.csv"


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class ImagePrepare(Prepare):
    bad_images: Literal["exclude", "error"]  # exclude: listed in `excluded`, never trained on
    min_size: int                       # an image whose shorter side is below this is bad, px
    max_flat_share: float               # an image with more of its pixels at one grey level is bad
    # copies of one image on both sides of the split: fail validation, or drop the validation copies
    duplicates: Literal["fail", "drop_valid"]

    def __post_init__(self):
        super().__post_init__()
        positive(self, "min_size")
        if not 0.0 < self.max_flat_share <= 1.0:
            raise ConfigError(f"max_flat_share must be in (0, 1], got {self.max_flat_share}")


@dataclass(frozen=True)
class ImageValidate(Validate):
    min_per_class: int                  # fewest training images of any class
    image_side: tuple[int, int]         # allowed width / height of the kept images, px

    def __post_init__(self):
        super().__post_init__()
        positive(self, "min_per_class")
        if not 1 <= self.image_side[0] <= self.image_side[1]:
            raise ConfigError(f"image_side must be [low, high] with 1 <= low <= high, got {list(self.image_side)}")


@dataclass(frozen=True)
class ImageEvaluate(Evaluate):
    top_losses: int                     # images in the top-losses grid
    gradcam: int                        # validation images, and as many top losses, in gradcam.png

    def __post_init__(self):
        super().__post_init__()
        positive(self, "top_losses")
        positive(self, "gradcam")


@dataclass(frozen=True)
class ImageModel(Section):
    """The declared input (every image is converted to it) and the training augmentation."""
    mode: Literal["L", "RGB"]           # every image is converted to this mode (counts recorded)
    size: tuple[int, int]               # width, height fed to the model
    resize: Literal["squish", "crop"]   # for images of another size: stretch, or short side + centre crop
    # the training pixels' mean/std, ImageNet's, or EfficientNet-Lite's (x - 127) / 128
    normalize: Literal["data", "imagenet", "lite", "none"]
    augment: Augment                    # fastai's aug_transforms knobs, on training batches only

    def __post_init__(self):
        if min(self.size) < 1:
            raise ConfigError(f"size must be positive, got {list(self.size)}")


@dataclass(frozen=True)
class ScratchNet(ImageModel):
    """A net trained from scratch: lesson 7's ResNet, a simple CNN, or lesson 5's linear nets."""
    arch: str                           # resnet | simple_cnn | linear
    widths: tuple[int, ...]             # conv widths, one stride-2 stage each
    hidden: tuple[int, ...]             # linear: hidden layers ([] = Mnist_Logistic, [50] = Mnist_NN)

    def __post_init__(self):
        from coursepipe.models.vision import ARCHS
        super().__post_init__()
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: {self.arch!r} is not one of {list(ARCHS)}")
        if not self.widths and self.arch != "linear":
            raise ConfigError(f"widths must be non-empty for arch {self.arch}")


@dataclass(frozen=True)
class PretrainedNet(ImageModel):
    """A torchvision body with fastai's head, fine-tuned from `weights`."""
    arch: str                           # efficientnet_lite0 | resnet18 | resnet34 | resnet50
    weights: str                        # none | package (installed ImageNet file) | http(s)/file URL | local file
    weights_cache: str                  # downloaded weight files, kept once verified
    weights_timeout_s: float            # a download stalling this long fails
    lin_ftrs: tuple[int, ...]           # fastai create_head hidden layers
    ps: float                           # head dropout (earlier layers ps / 2)
    weights_sha256: str | None = None   # URL: None takes torchvision's hash prefix in the file name

    def __post_init__(self):
        from coursepipe.models.transfer import ARCHS
        super().__post_init__()
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: {self.arch!r} is not one of {list(ARCHS)}")
        if not 0.0 <= self.ps < 1.0:
            raise ConfigError(f"ps must be in [0, 1), got {self.ps}")
        if self.mode != "RGB":
            raise ConfigError(f"mode: a pretrained backbone reads RGB (grayscale sources are "
                              f"converted), got {self.mode!r}")


# ----------------------------------------------------------------------------- the table

def manifest_table(files: list[tuple[Path, str]], root: Path) -> pd.DataFrame:
    """The manifest of (file, label) pairs with the policy columns started: an unreadable file is
    never usable, whatever the policy; prepare adds the other reasons and the split checks."""
    from coursepipe.vision.manifest import manifest

    df = manifest(files, root)
    df["excluded"] = df["decode_error"]
    df["duplicate"] = ""
    df["class_images"] = 0
    return df


def bad_reasons(df: pd.DataFrame, min_size: int, max_flat_share: float = 1.0) -> pd.Series:
    """Per row: '' or why the file is bad, naming it: the reason already recorded, its shorter
    side below min_size, or a single-colour / near-empty frame (more than max_flat_share of its
    pixels at one grey level; 1.0 checks only exactly flat images)."""
    from coursepipe.vision.manifest import flat_share

    small = df["decodable"] & (np.minimum(df["width"], df["height"]) < min_size)
    sizes = df["path"] + ": too small (" + df["width"].astype(str) + "x" + df["height"].astype(str) \
        + f" < min_size {min_size})"
    out = df["excluded"].copy()
    out = out.mask((out == "") & small, sizes)
    for i in np.flatnonzero(((out == "") & df["decodable"]).to_numpy()):
        share = flat_share(df["image"].iloc[i])
        if share > max_flat_share or share == 1.0:
            out.iloc[i] = (f"{df['path'].iloc[i]}: single colour or near empty ({share:.1%} of "
                           f"pixels at one level > max_flat_share {max_flat_share:.1%})")
    return out


def drop_valid_copies(df: pd.DataFrame, valid: np.ndarray) -> tuple[pd.Series, pd.Series, int]:
    """prepare.duplicates: drop_valid: the validation copies of training images become excluded
    rows (named), and no copy is left across the split. Returns (excluded, duplicate, count)."""
    copies = (df["duplicate"] != "").to_numpy() & valid
    excluded = df["excluded"].mask(pd.Series(copies, index=df.index) & (df["excluded"] == ""),
                                   df["path"] + ": copy of a training image (prepare.duplicates: drop_valid)")
    return excluded, pd.Series("", index=df.index, dtype=object), int(copies.sum())


def usable(df: pd.DataFrame) -> pd.DataFrame:
    """The rows the bad-image policy keeps."""
    return df[df["excluded"] == ""]


def pixels(processor: dict, df: pd.DataFrame) -> np.ndarray:
    """uint8 (N, C, H, W) for the rows, in the processor's mode and size."""
    from coursepipe.vision.images import decode_many
    return decode_many(df["image"], processor["mode"], tuple(processor["size"]), processor["resize"])


def gradcam_png(model, x, classes: list[str], notes: list[str]) -> bytes:
    """Grad-CAM overlays for the predicted class of each image, titled with prediction, its
    probability and `notes` (e.g. the actual class)."""
    import torch

    from coursepipe.vision.gradcam import gradcam, plot_gradcam

    cams, predicted = gradcam(model, x)
    with torch.no_grad():
        prob = torch.softmax(model(x), 1).max(1).values.numpy()
    titles = [f"{classes[c]} {p:.2f}\n{note}" for c, p, note in zip(predicted, prob, notes)]
    return plot_gradcam(x.numpy(), cams, titles)


# ----------------------------------------------------------------------------- the kind

class ImageClassification(Kind):
    name = "image_classification"
    portable = "coursepipe.export.portable_image"
    model_configs = (ScratchNet, PretrainedNet)
    prepare_config = ImagePrepare
    validate_config = ImageValidate
    evaluate_config = ImageEvaluate

    def prepare(self, recipe, df, p: ImagePrepare):
        """The bad-image policy, then the split (the recipe's fixed one, else a seeded random
        valid_pct of the usable images; bad ones stay on the training side, unused), then the
        checks that need the split: duplicates across it and training images per class."""
        from coursepipe.data.split import split_mask
        from coursepipe.vision.manifest import cross_split_duplicates

        out = df.copy()
        reasons = bad_reasons(out, p.min_size, p.max_flat_share)
        bad = (reasons != "").to_numpy()
        listed = "; ".join(reasons[bad].head(20))
        if bad.any() and p.bad_images == "error":
            raise ValueError(f"prepare@{recipe.name}: {int(bad.sum())} bad images "
                             f"(prepare.bad_images: error): {listed}")
        keep = np.flatnonzero(~bad)
        if len(keep) == 0:
            raise ValueError(f"prepare@{recipe.name}: no usable images among {len(out)} files: {listed}")
        fixed = recipe.split(out, p) if recipe.split is not None else None
        if fixed is not None:
            mask = np.asarray(fixed, dtype=bool)
        else:
            mask = np.zeros(len(out), dtype=bool)
            mask[keep[split_mask(len(keep), p.valid_pct, p.seed)]] = True
        out["excluded"] = reasons.to_numpy()
        out["duplicate"] = cross_split_duplicates(out["sha256"], out["path"], pd.Series(mask, index=out.index))
        if p.duplicates == "drop_valid" and (out["duplicate"] != "").any():
            out["excluded"], out["duplicate"], n = drop_valid_copies(out, mask)
            print(f"prepare@{recipe.name}: dropped {n} validation image(s) that copy a training "
                  f"image (prepare.duplicates: drop_valid; listed in `excluded`)")
            bad = (out["excluded"] != "").to_numpy()
        counts = out.loc[~bad & ~mask, TARGET].value_counts()
        out["class_images"] = out[TARGET].map(counts).fillna(0).astype("int64")
        out["is_valid"] = mask
        if bad.any():
            print(f"prepare@{recipe.name}: excluded {int(bad.sum())} of {len(out)} images "
                  f"(prepare.bad_images: exclude; listed in the table's `excluded` column): {listed}")
        return seeded_order(out, p.seed)

    def expectations(self, recipe, v: ImageValidate) -> list[Spec]:
        """Readable files of allowed size and mode, enough training images per class, no copies
        across the split; excluded files are reported (count and names), not failed on.

        Rules whose failure should name files test columns that hold file names (excluded,
        duplicate, path); size and mode rules skip the excluded rows (already named)."""
        lo, hi = v.image_side
        ok = {"row_condition": OK, "condition_parser": "pandas"}
        return [
            # the policy's report: always passes (mostly 0), lists the excluded files and their count
            ("expect_column_values_to_be_in_set", {"column": "excluded", "value_set": [""], "mostly": 0.0}),
            ("expect_column_values_to_be_in_set", {"column": "decodable", "value_set": [True], **ok}),
            ("expect_column_values_to_be_in_set", {"column": "duplicate", "value_set": [""]}),
            ("expect_column_values_to_be_between", {"column": "width", "min_value": lo, "max_value": hi, **ok}),
            ("expect_column_values_to_be_between", {"column": "height", "min_value": lo, "max_value": hi, **ok}),
            ("expect_column_values_to_be_in_set", {"column": "mode", "value_set": list(MODES), **ok}),
            ("expect_column_values_to_be_between", {"column": "class_images", "min_value": v.min_per_class, **ok}),
            ("expect_column_values_to_match_regex", {"column": "sha256", "regex": r"^[0-9a-f]{64}$"}),
        ]

    def prefetch(self, m) -> None:
        """On the driver, before Ray starts: fetch and hash-check pretrained weights once, so a bad
        URL or hash is one clear error line instead of a worker failure."""
        if isinstance(m, PretrainedNet):
            from coursepipe.models.transfer import resolve
            resolve(m.weights, m.weights_cache, m.weights_sha256, m.weights_timeout_s, m.arch)

    def fit_processor(self, recipe, train, m: ImageModel) -> dict:
        """Classes (fixed by the schema, else from the usable training rows), the declared input,
        normalisation stats, and how many images each source mode converted."""
        from coursepipe.vision.images import CHANNELS, normalisation

        train = usable(train)
        classes = list(recipe.schema.classes) or sorted(train[TARGET].unique().tolist())
        proc = {"classes": classes, "mode": m.mode, "size": list(m.size), "resize": m.resize,
                "normalize": m.normalize}
        # only the data's own statistics need the pixels decoded
        x = pixels(proc, train) if m.normalize == "data" else np.zeros((1, CHANNELS[m.mode], 1, 1), np.uint8)
        mean, std = normalisation(m.normalize, x)
        modes = train["mode"].value_counts().sort_index()
        return {**proc, "mean": mean, "std": std, "target": TARGET,
                "source_modes": {str(k): int(v) for k, v in modes.items()},
                "converted": int((train["mode"] != m.mode).sum())}

    def tensors(self, recipe, processor: dict, df) -> tuple:
        """(x uint8 (N, C, H, W), y int64) for the usable rows."""
        import torch

        df = usable(df)
        index = {c: i for i, c in enumerate(processor["classes"])}
        y = df[TARGET].map(index)
        if y.isna().any():
            raise ValueError(f"labels outside the training classes: {sorted(set(df[TARGET][y.isna()]))[:5]}")
        return torch.from_numpy(pixels(processor, df)), torch.tensor(y.to_numpy(np.int64))

    def build_model(self, recipe, processor: dict, m: ImageModel):
        n_classes, mean, std = len(processor["classes"]), processor["mean"], processor["std"]
        if isinstance(m, PretrainedNet):
            from coursepipe.models.transfer import TransferNet
            return TransferNet(m.arch, n_classes, mean, std, m.lin_ftrs, m.ps)
        from coursepipe.models.vision import build
        from coursepipe.vision.images import CHANNELS
        return build(m.arch, CHANNELS[m.mode], n_classes, tuple(m.size), mean, std, m.widths, m.hidden)

    def splitter(self, m, model) -> list[list]:
        if isinstance(m, PretrainedNet):
            from coursepipe.models.transfer import splitter
            return splitter(model)
        return [list(model.parameters())]

    def loss_func(self, m):
        import torch
        return torch.nn.CrossEntropyLoss()

    def metrics(self, m) -> dict:
        from coursepipe.learn.loop import accuracy
        return {"accuracy": accuracy}

    def callbacks(self, recipe, m: ImageModel, t) -> list:
        """Pretrained backbone weights (fresh runs), then seeded batch augmentation."""
        from coursepipe.vision.augment import AugmentBatch

        cbs: list = []
        if isinstance(m, PretrainedNet) and m.weights not in ("", "none"):
            from coursepipe.models.transfer import LoadPretrained
            cbs.append(LoadPretrained(m.weights, m.weights_cache, m.weights_sha256,
                                      m.weights_timeout_s, m.arch))
        if m.augment.active:
            cbs.append(AugmentBatch(m.augment, t.seed))
        return cbs

    def heavy_columns(self, m) -> tuple[str, ...]:
        return ("image",)                  # encoded bytes: decoded in Ray Data's tasks

    def processor_columns(self, m: ImageModel) -> tuple[str, ...]:
        return ("image",) if m.normalize == "data" else ()   # only the data's own stats need pixels

    def usable(self, df):
        return usable(df)

    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """Accuracy / error rate, confusion matrix, most-confused pairs, top-losses grid."""
        import torch

        from coursepipe.io import write_bytes, write_text
        from coursepipe.learn.interpret import CONFUSION_PNG, report_classification
        from coursepipe.vision.interpret import most_confused, most_confused_csv, plot_top_losses, top_losses

        valid = usable(run.valid).reset_index(drop=True)
        classes = list(run.processor["classes"])
        x, y = self.tensors(run.recipe, run.processor, valid)
        metrics, logits, cm = report_classification(run, (x,), y, classes, self.loss_func(run.model_config))
        write_text(run.plots / CONFUSED_CSV, most_confused_csv(most_confused(cm, classes)))
        predicted, actual = logits.argmax(1).numpy(), y.numpy()
        losses = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
        prob_actual = torch.softmax(logits, 1)[torch.arange(len(y)), y].numpy()
        idx = top_losses(losses, run.config.top_losses)
        titles = [f"{classes[predicted[i]]}/{classes[actual[i]]} / {losses[i]:.2f} / {prob_actual[i]:.2f}\n"
                  f"{Path(valid['path'].iloc[i]).name}" for i in idx]
        write_bytes(run.plots / TOP_LOSSES_PNG, plot_top_losses(x[idx].numpy(), titles))
        picks = [*range(min(run.config.gradcam, len(valid))), *idx[:run.config.gradcam]]
        write_bytes(run.plots / GRADCAM_PNG, gradcam_png(run.model, x[picks], classes,
                                                         [f"actual {classes[actual[i]]}" for i in picks]))
        return metrics, run.plots / CONFUSION_PNG

    def card(self, recipe, processor: dict) -> dict:
        return {"target": processor["target"], "classes": list(processor["classes"]),
                "input": {"mode": processor["mode"], "size": processor["size"],
                          "resize": processor["resize"]}}
