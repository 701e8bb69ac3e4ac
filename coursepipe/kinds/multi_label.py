"""Multi-label image classification (lesson 3, planet): any number of tags per image.

The prepared table is the image kind's manifest (coursepipe/kinds/image.py: one row per file with
its size, mode, hash and bytes, and the same bad-image, split and duplicate policies) with the
label replaced by a tag list:
  tags          the image's tags, sorted, unique, joined by single spaces ('clear primary water');
                a tag never holds a space (layout readers turn one into '_'), so the GX suite can
                check the column with a regex and a reader can split it back without ambiguity
  tag_images    the fewest training images of any of the row's tags (the suite's min_per_class
                rule reads it: a tag seen only in validation, or too rarely, fails validation)
Model: a pretrained backbone with fastai's head and one logit per tag; sigmoid outputs, BCE with
logits, fastai's accuracy_thresh and samples-averaged F-beta (beta 2, threshold 0.2 in lesson 3).
The decision threshold is a model param: it is recorded in the processor, so predict.py uses the
threshold the metrics were computed with; evaluate also reports the best one on validation.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from coursepipe.config import ConfigError
from coursepipe.contract import Evaluation, Spec
from coursepipe.kinds.image import (OK, ImageClassification, ImageEvaluate, ImagePrepare, ImageValidate,
                                    PretrainedNet, pixels, usable)

TAGS = "tags"
TAG_REGEX = r"^[^ ]+( [^ ]+)*$"       # one or more tags, single spaces between, none empty
PER_TAG_PNG = "per_tag.png"
PER_TAG_CSV = "per_tag.csv"
THRESHOLDS_PNG = "thresholds.png"
THRESHOLDS_CSV = "thresholds.csv"
WORST_PNG = "worst_images.png"
GRADCAM_PNG = "gradcam.png"


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class MultiLabelEvaluate(ImageEvaluate):
    """top_losses: the worst images (highest BCE); thresholds: the sweep for the best threshold."""
    thresholds: tuple[float, float, float]   # first, last, step of the swept decision thresholds

    def __post_init__(self):
        super().__post_init__()
        lo, hi, step = self.thresholds
        if not (0.0 < lo <= hi < 1.0 and step > 0):
            raise ConfigError(f"thresholds must be [first, last, step] with 0 < first <= last < 1 "
                              f"and step > 0, got {list(self.thresholds)}")


@dataclass(frozen=True)
class MultiLabelNet(PretrainedNet):
    """A pretrained backbone with fastai's head, one sigmoid output per tag."""
    threshold: float = field(kw_only=True)   # a tag is predicted when its probability is above this
    beta: float = field(kw_only=True)        # F-beta's recall weight (planet's F2: 2)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")


# ----------------------------------------------------------------------------- tags

def parse_tags(cell: str, delim: str) -> list[str]:
    """A label cell -> its tags, sorted and unique (empty pieces from doubled delimiters dropped)."""
    return sorted({t.strip() for t in cell.split(delim) if t.strip()})


def tag_lists(tags: pd.Series) -> list[list[str]]:
    return [s.split() for s in tags]


def unknown_tags(tags: pd.Series, paths: pd.Series, vocabulary) -> list[str]:
    """'tag (file)' for every tag outside the vocabulary, first file only per tag."""
    allowed, seen = set(vocabulary), {}
    for path, row in zip(paths, tag_lists(tags)):
        for t in row:
            if t not in allowed and t not in seen:
                seen[t] = path
    return [f"{t!r} ({p})" for t, p in seen.items()]


def tag_images(tags: pd.Series, train: np.ndarray) -> pd.Series:
    """Per row: the fewest training rows among its tags (0 when a tag has none)."""
    counts: dict[str, int] = {}
    for row in (r for r, t in zip(tag_lists(tags), train) if t):
        for tag in row:
            counts[tag] = counts.get(tag, 0) + 1
    return pd.Series([min((counts.get(t, 0) for t in row), default=0) for row in tag_lists(tags)],
                     index=tags.index, dtype="int64")


def multi_hot(tags: pd.Series, classes: list[str]) -> np.ndarray:
    """float32 (N, n_classes): 1 where the row has the tag; a tag outside `classes` is an error."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.zeros((len(tags), len(classes)), np.float32)
    for r, row in enumerate(tag_lists(tags)):
        for t in row:
            if t not in index:
                raise ValueError(f"tag {t!r} is not one of the training tags {classes[:10]}...")
            out[r, index[t]] = 1.0
    return out


# ----------------------------------------------------------------------------- metrics

def accuracy_thresh(logits, y, threshold: float):
    """fastai's accuracy_thresh as (sum, count): the share of (image, tag) decisions that are right."""
    import torch
    from torchmetrics.functional.classification import multilabel_accuracy

    acc = multilabel_accuracy(torch.sigmoid(logits), y.long(), num_labels=y.shape[1],
                              threshold=threshold, average="micro")
    n = float(y.numel())
    return (acc.double() * n), torch.tensor(n, dtype=torch.float64, device=y.device)


def fbeta_samples(logits, y, threshold: float, beta: float):
    """fastai's fbeta (planet's F2) as (sum, count): F-beta of each image's tag set, averaged over
    images. torchmetrics' multilabel F-beta averages over labels (micro / macro / weighted), not
    over samples; its binary F-beta with multidim_average='samplewise' on (N, tags) scores each row
    over its tags, which is the samples average (an image with no tags and none predicted scores 0,
    as in fastai)."""
    import torch
    from torchmetrics.functional.classification import binary_fbeta_score

    per_image = binary_fbeta_score(torch.sigmoid(logits), y.long(), beta=beta, threshold=threshold,
                                   multidim_average="samplewise")
    return per_image.sum().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)


def threshold_sweep(probs, y, lo: float, hi: float, step: float, beta: float) -> pd.DataFrame:
    """F-beta and accuracy_thresh at every threshold of the grid (rounded to the step's digits)."""
    import torch

    logits = torch.logit(probs.clamp(1e-7, 1 - 1e-7))
    grid = np.round(np.arange(lo, hi + step / 2, step), 6)
    rows = []
    for t in grid:
        f, n = fbeta_samples(logits, y, float(t), beta)
        a, m = accuracy_thresh(logits, y, float(t))
        rows.append({"threshold": float(t), "fbeta": float(f / n), "accuracy_thresh": float(a / m)})
    return pd.DataFrame(rows)


def per_tag(probs: np.ndarray, y: np.ndarray, classes: list[str], threshold: float) -> pd.DataFrame:
    """Per tag at the threshold: validation images with it, predicted, right, precision, recall."""
    pred = probs > threshold
    actual = y > 0.5
    hit = (pred & actual).sum(0)
    n_actual, n_pred = actual.sum(0), pred.sum(0)
    return pd.DataFrame({"tag": classes, "n_actual": n_actual, "n_predicted": n_pred, "n_correct": hit,
                         "precision": np.where(n_pred > 0, hit / np.maximum(n_pred, 1), 0.0),
                         "recall": np.where(n_actual > 0, hit / np.maximum(n_actual, 1), 0.0)})


# ----------------------------------------------------------------------------- pictures

def plot_per_tag(table: pd.DataFrame, title: str, dpi: int = 100) -> bytes:
    """Precision and recall per tag as paired horizontal bars, with each tag's count."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(table)
    fig = Figure(figsize=(7, max(3.0, 0.4 * n + 1.5)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    pos = np.arange(n)
    ax.barh(pos - 0.2, table["precision"], 0.4, label="precision")
    ax.barh(pos + 0.2, table["recall"], 0.4, label="recall")
    ax.set_yticks(pos, labels=[f"{t} (n={k})" for t, k in zip(table["tag"], table["n_actual"])])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_thresholds(sweep: pd.DataFrame, threshold: float, best: float, title: str, dpi: int = 100) -> bytes:
    """F-beta and accuracy_thresh against the threshold; the trained one and the best marked."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(sweep["threshold"], sweep["fbeta"], marker=".", label="F-beta (samples)")
    ax.plot(sweep["threshold"], sweep["accuracy_thresh"], marker=".", label="accuracy_thresh")
    ax.axvline(threshold, color="grey", linestyle="--", label=f"model.threshold {threshold:g}")
    ax.axvline(best, color="green", linestyle=":", label=f"best {best:g}")
    ax.set_xlabel("threshold")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower center")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def gradcam_png(model, x, classes: list[str], notes: list[str]) -> bytes:
    """Grad-CAM overlays for each image's most probable tag, titled with it, its sigmoid
    probability and `notes` (the image kind's version titles a softmax probability)."""
    import torch

    from coursepipe.vision.gradcam import gradcam, plot_gradcam

    cams, top = gradcam(model, x)
    with torch.no_grad():
        prob = torch.sigmoid(model(x)).max(1).values.numpy()
    titles = [f"{classes[c]} {p:.2f}\n{note}" for c, p, note in zip(top, prob, notes)]
    return plot_gradcam(x.numpy(), cams, titles)


def joined(classes: list[str], row: np.ndarray, width: int = 0) -> str:
    """The tags that are on, space-joined ('-' for none); wrapped at `width` characters if given."""
    import textwrap

    text = " ".join(c for c, on in zip(classes, row) if on) or "-"
    return textwrap.fill(text, width) if width else text


# ----------------------------------------------------------------------------- the kind

class MultiLabelClassification(ImageClassification):
    """The image kind with a tag list per image: its image handling (bad-image policy, split,
    duplicates, decoding, augmentation, pretrained weights, streaming) is inherited unchanged."""
    name = "multi_label"
    portable = "coursepipe.export.portable_multi_label"
    model_configs = (MultiLabelNet,)
    prepare_config = ImagePrepare
    validate_config = ImageValidate
    evaluate_config = MultiLabelEvaluate

    def prepare(self, recipe, df, p: ImagePrepare):
        """The image kind's policy and split (it counts class images by a `label` column: given
        the tag string for the call, then replaced by the per-tag count). The layout reader has
        already checked the tags against its vocabulary (unknown_tags), naming files."""
        out = super().prepare(recipe, df.assign(label=df[TAGS]), p)
        used = ((out["excluded"] == "") & ~out["is_valid"]).to_numpy()
        out["tag_images"] = tag_images(out[TAGS], used)
        return out.drop(columns=["label", "class_images"])

    def expectations(self, recipe, v: ImageValidate) -> list[Spec]:
        """The image kind's file rules (its per-class rule read per tag), every kept row tagged."""
        ok = {"row_condition": OK, "condition_parser": "pandas"}
        out = []
        for kind_, kwargs in super().expectations(recipe, v):
            if kwargs.get("column") == "class_images":
                kwargs = {**kwargs, "column": "tag_images"}
            out.append((kind_, kwargs))
        out.append(("expect_column_values_to_match_regex", {"column": TAGS, "regex": TAG_REGEX, **ok}))
        return out

    def fit_processor(self, recipe, train, m: MultiLabelNet) -> dict:
        """Tags (fixed by the schema, else every tag of the usable training rows, sorted), the
        declared input, normalisation, and the decision threshold predict.py applies."""
        from coursepipe.vision.images import CHANNELS, normalisation

        train = usable(train)
        classes = list(recipe.schema.classes) or sorted({t for row in tag_lists(train[TAGS]) for t in row})
        proc = {"classes": classes, "mode": m.mode, "size": list(m.size), "resize": m.resize,
                "normalize": m.normalize}
        x = pixels(proc, train) if m.normalize == "data" else np.zeros((1, CHANNELS[m.mode], 1, 1), np.uint8)
        mean, std = normalisation(m.normalize, x)
        modes = train["mode"].value_counts().sort_index()
        return {**proc, "mean": mean, "std": std, "target": TAGS, "threshold": m.threshold,
                "beta": m.beta, "source_modes": {str(k): int(v) for k, v in modes.items()},
                "converted": int((train["mode"] != m.mode).sum())}

    def tensors(self, recipe, processor: dict, df) -> tuple:
        """(x uint8 (N, C, H, W), y float32 multi-hot (N, tags)) for the usable rows."""
        import torch

        df = usable(df)
        try:
            y = multi_hot(df[TAGS], list(processor["classes"]))
        except ValueError as e:
            raise ValueError(f"{e}; files: {list(df['path'].head(3))}") from None
        return torch.from_numpy(pixels(processor, df)), torch.from_numpy(y)

    def loss_func(self, m):
        import torch
        return torch.nn.BCEWithLogitsLoss()

    def metrics(self, m: MultiLabelNet) -> dict:
        return {"accuracy_thresh": functools.partial(accuracy_thresh, threshold=m.threshold),
                "fbeta": functools.partial(fbeta_samples, threshold=m.threshold, beta=m.beta)}

    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """accuracy_thresh and F-beta at model.threshold, the best threshold of the sweep, per-tag
        precision / recall, the worst images (highest BCE) and Grad-CAM of each image's top tag."""
        import torch

        from coursepipe.io import write_bytes, write_text
        from coursepipe.learn.infer import predict_logits
        from coursepipe.vision.interpret import plot_top_losses, top_losses

        valid = usable(run.valid).reset_index(drop=True)
        proc = run.processor
        classes, threshold, beta = list(proc["classes"]), float(proc["threshold"]), float(proc["beta"])
        x, y = self.tensors(run.recipe, proc, valid)
        logits = predict_logits(run.model, (x,), run.config.bs)
        probs = torch.sigmoid(logits)
        losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
        acc, n_acc = accuracy_thresh(logits, y, threshold)
        fb, n_fb = fbeta_samples(logits, y, threshold, beta)
        lo, hi, step = run.config.thresholds
        sweep = threshold_sweep(probs, y, lo, hi, step, beta)
        best = sweep.loc[sweep["fbeta"].idxmax()]         # first of ties: the lowest threshold
        metrics: dict = {"n_valid": len(valid), "valid_loss": float(losses.mean()),
                         "accuracy_thresh": float(acc / n_acc), "fbeta": float(fb / n_fb),
                         "threshold": threshold, "beta": beta,
                         "best_threshold": float(best["threshold"]), "fbeta_at_best": float(best["fbeta"])}
        table = per_tag(probs.numpy(), y.numpy(), classes, threshold)
        for r in table.itertuples():
            metrics.update({f"n_actual_{r.tag}": int(r.n_actual), f"precision_{r.tag}": float(r.precision),
                            f"recall_{r.tag}": float(r.recall)})
        write_text(run.plots / PER_TAG_CSV, table.to_csv(index=False))
        write_text(run.plots / THRESHOLDS_CSV, sweep.to_csv(index=False))
        write_bytes(run.plots / PER_TAG_PNG, plot_per_tag(
            table, f"{run.name}: per tag at threshold {threshold:g} (n={len(valid)})"))
        write_bytes(run.plots / THRESHOLDS_PNG, plot_thresholds(
            sweep, threshold, float(best["threshold"]), f"{run.name}: validation F{beta:g} by threshold"))
        pred, actual = probs.numpy() > threshold, y.numpy() > 0.5
        idx = top_losses(losses.numpy(), run.config.top_losses)
        titles = [f"{joined(classes, pred[i], 36)}\n{joined(classes, actual[i], 36)} / {losses[i]:.2f}\n"
                  f"{Path(valid['path'].iloc[i]).name}" for i in idx]
        write_bytes(run.plots / WORST_PNG, plot_top_losses(
            x[idx].numpy(), titles, suptitle="predicted tags / actual tags / mean BCE"))
        picks = [*range(min(run.config.gradcam, len(valid))), *idx[:run.config.gradcam]]
        write_bytes(run.plots / GRADCAM_PNG, gradcam_png(
            run.model, x[picks], classes, [f"actual {joined(classes, actual[i])}" for i in picks]))
        return metrics, run.plots / PER_TAG_PNG

    def card(self, recipe, processor: dict) -> dict:
        return {"target": processor["target"], "classes": list(processor["classes"]),
                "threshold": processor["threshold"], "beta": processor["beta"],
                "input": {"mode": processor["mode"], "size": processor["size"],
                          "resize": processor["resize"]}}
