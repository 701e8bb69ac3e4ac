"""Point regression (lesson 3's head pose): one (x, y) point per image file.

The prepared table is the image manifest (coursepipe/vision/manifest.py: path, size, mode, hash,
bytes) plus the recipe's point columns `x`, `y` (pixels of the file as stored) and `problem`
('' or why the row cannot be used, naming the file). Prepare stops on any problem (an undecodable
frame, a point outside its frame): a wrong point is a wrong label, and every point counts.
The model learns in [-1, 1] units of the frame (fastai's scaled points), so any input size maps
linearly; loss and metric are MSE in those units (the course: 0.0028 on BIWI).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from coursepipe.config import ConfigError, Evaluate, Validate, positive
from coursepipe.contract import Evaluation, Kind, Spec
from coursepipe.data.split import seeded_order
from coursepipe.kinds.image import MODES, PretrainedNet

POINT = ("x", "y")
POINTS_PNG = "points.png"
PREDICTIONS_CSV = "predictions.csv"


# ----------------------------------------------------------------------------- sections

@dataclass(frozen=True)
class PointValidate(Validate):
    image_side: tuple[int, int]         # allowed width / height of the frames, px

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.image_side[0] <= self.image_side[1]:
            raise ConfigError(f"image_side must be [low, high] with 1 <= low <= high, got {list(self.image_side)}")


@dataclass(frozen=True)
class PointEvaluate(Evaluate):
    pictures: int                       # validation images drawn with actual and predicted points

    def __post_init__(self):
        super().__post_init__()
        positive(self, "pictures")


@dataclass(frozen=True, kw_only=True)
class PointNet(PretrainedNet):
    """A pretrained body (models/transfer.py) with a point head (models/points.py)."""
    head: Literal["softargmax", "pool"]  # heatmap + soft-argmax, or fastai's pooled head (lin_ftrs, ps)

    def __post_init__(self):
        super().__post_init__()
        if self.resize != "squish":  # a crop could cut the point out, and breaks the linear map
            raise ConfigError(f"resize: points need squish (the whole frame, mapped linearly), got {self.resize!r}")


# ----------------------------------------------------------------------------- rows

def problems(df: pd.DataFrame) -> pd.Series:
    """Per row: '' or why it cannot be used, naming the file: undecodable, or its point outside
    the frame (or missing)."""
    x, y = df["x"].astype(float), df["y"].astype(float)
    inside = x.between(0, df["width"]) & y.between(0, df["height"])
    outside = (df["path"] + ": point (" + x.round(1).astype(str) + ", " + y.round(1).astype(str)
               + ") is outside its " + df["width"].astype(str) + "x" + df["height"].astype(str) + " frame")
    out = df["decode_error"].astype(str).copy()
    return out.mask((out == "") & ~inside, outside)


def units(df: pd.DataFrame) -> np.ndarray:
    """The rows' points in [-1, 1] units of their own frames, (N, 2) float64."""
    from coursepipe.vision.points import to_units
    return to_units(df[list(POINT)].to_numpy(np.float64), df["width"].to_numpy(), df["height"].to_numpy())


def pixels(processor: dict, df: pd.DataFrame) -> np.ndarray:
    """uint8 (N, C, H, W) at the processor's size, decoded by the export's own code."""
    from coursepipe.export.portable_points import decode_many
    return decode_many(df["image"], processor["mode"], tuple(processor["size"]))[0]


# ----------------------------------------------------------------------------- the kind

class PointRegression(Kind):
    name = "point_regression"
    portable = "coursepipe.export.portable_points"
    model_configs = (PointNet,)
    validate_config = PointValidate
    evaluate_config = PointEvaluate

    def prepare(self, recipe, df, p):
        """The recipe's split (or the seeded random one), after every row is checked: a frame
        that does not decode or whose point lies outside it stops prepare, naming the files."""
        bad = problems(df)
        if (bad != "").any():
            listed = "; ".join(bad[bad != ""].head(10))
            raise ValueError(f"prepare@{recipe.name}: {int((bad != '').sum())} unusable frame(s): {listed}")
        out = super().prepare(recipe, df, p)
        out["problem"] = bad.to_numpy()
        for side, rows in (("training", ~out["is_valid"]), ("validation", out["is_valid"])):
            if not rows.any():
                raise ValueError(f"prepare@{recipe.name}: no {side} frames (check the split settings)")
        # BIWI lists a person's frames together: the streaming path's local shuffle needs mixed rows
        return seeded_order(out, p.seed)

    def expectations(self, recipe, v: PointValidate) -> list[Spec]:
        """Usable rows (the `problem` column names the files), frames of allowed size and mode,
        points inside the largest allowed frame."""
        lo, hi = v.image_side
        return [
            ("expect_column_values_to_be_in_set", {"column": "problem", "value_set": [""]}),
            ("expect_column_values_to_be_in_set", {"column": "decodable", "value_set": [True]}),
            ("expect_column_values_to_be_between", {"column": "width", "min_value": lo, "max_value": hi}),
            ("expect_column_values_to_be_between", {"column": "height", "min_value": lo, "max_value": hi}),
            ("expect_column_values_to_be_in_set", {"column": "mode", "value_set": list(MODES)}),
            ("expect_column_values_to_be_between", {"column": "x", "min_value": 0, "max_value": hi}),
            ("expect_column_values_to_be_between", {"column": "y", "min_value": 0, "max_value": hi}),
            ("expect_column_values_to_match_regex", {"column": "sha256", "regex": r"^[0-9a-f]{64}$"}),
        ]

    def prefetch(self, m: PointNet) -> None:
        """Fetch and hash-check the pretrained weights on the driver, before Ray starts."""
        from coursepipe.models.transfer import resolve
        resolve(m.weights, m.weights_cache, m.weights_sha256, m.weights_timeout_s, m.arch)

    def fit_processor(self, recipe, train, m: PointNet) -> dict:
        """The declared input, its normalisation, and the training points' mean (the
        predict-the-mean baseline evaluate reports)."""
        from coursepipe.vision.images import CHANNELS, normalisation

        mean, std = normalisation(m.normalize, np.zeros((1, CHANNELS[m.mode], 1, 1), np.uint8)) \
            if m.normalize != "data" else normalisation("data", pixels({"mode": m.mode, "size": m.size}, train))
        return {"mode": m.mode, "size": list(m.size), "resize": m.resize, "normalize": m.normalize,
                "mean": mean, "std": std, "target": list(POINT),
                "units": "model output (u, v) in [-1, 1]: x = (u + 1) * width / 2, y = (v + 1) * height / 2",
                "target_mean": units(train).mean(0).tolist()}

    # the streaming path (train.data_path: ray_data): Ray Data's tasks decode the frames with
    # tensors() (Kind.stream_rows' default); AugmentPoints moves image and point on the worker
    def heavy_columns(self, m) -> tuple[str, ...]:
        return ("image",)

    def processor_columns(self, m: PointNet) -> tuple[str, ...]:
        return ("image",) if m.normalize == "data" else ()   # only the data's own stats need pixels

    def tensors(self, recipe, processor: dict, df) -> tuple:
        """(x uint8 (N, C, H, W), y float32 (N, 2) in units)."""
        import torch
        return torch.from_numpy(pixels(processor, df)), torch.from_numpy(units(df).astype(np.float32))

    def build_model(self, recipe, processor: dict, m: PointNet):
        from coursepipe.models.points import PointNet as Net
        return Net(m.arch, processor["mean"], processor["std"], m.head, m.lin_ftrs, m.ps)

    def splitter(self, m, model) -> list[list]:
        from coursepipe.models.transfer import splitter  # body early / body late / head
        return splitter(model)

    def loss_func(self, m):
        import torch
        return torch.nn.MSELoss()

    def metrics(self, m) -> dict:
        return {"mse": squared_error}

    def callbacks(self, recipe, m: PointNet, t) -> list:
        """Pretrained backbone weights (fresh runs), then seeded augmentation moving the points."""
        cbs: list = []
        if m.weights not in ("", "none"):
            from coursepipe.models.transfer import LoadPretrained
            cbs.append(LoadPretrained(m.weights, m.weights_cache, m.weights_sha256,
                                      m.weights_timeout_s, m.arch))
        if m.augment.active:
            from coursepipe.vision.points import AugmentPoints
            cbs.append(AugmentPoints(m.augment, t.seed))
        return cbs

    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """MSE in units (and the predict-the-training-mean baseline), mean error in pixels of the
        frames, a CSV of every prediction and a picture of the first validation frames."""
        from coursepipe.io import write_bytes, write_text
        from coursepipe.learn.infer import predict_logits
        from coursepipe.vision.points import plot_points, to_pixels

        valid = run.valid.reset_index(drop=True)
        x, y = self.tensors(run.recipe, run.processor, valid)
        pred = predict_logits(run.model, (x,), run.config.bs).numpy().astype(np.float64)
        actual = y.numpy().astype(np.float64)
        w, h = valid["width"].to_numpy(), valid["height"].to_numpy()
        err_px = np.linalg.norm(to_pixels(pred, w, h) - to_pixels(actual, w, h), axis=1)
        mean = np.asarray(run.processor["target_mean"])
        metrics = {"n_valid": len(valid), "mse": float(((pred - actual) ** 2).mean()),
                   "mse_baseline_mean": float(((mean - actual) ** 2).mean()),
                   "mean_error_px": float(err_px.mean()), "median_error_px": float(np.median(err_px))}
        px = to_pixels(pred, w, h)
        table = pd.DataFrame({"path": valid["path"], "x": valid["x"], "y": valid["y"],
                              "pred_x": px[:, 0].round(2), "pred_y": px[:, 1].round(2),
                              "error_px": err_px.round(2)})
        write_text(run.plots / PREDICTIONS_CSV, table.to_csv(index=False))
        n = min(run.config.pictures, len(valid))
        titles = [f"{Path(valid['path'].iloc[i]).parent.name}/{Path(valid['path'].iloc[i]).name[:11]}"
                  f" {err_px[i]:.1f} px" for i in range(n)]
        picture = run.plots / POINTS_PNG
        write_bytes(picture, plot_points(x[:n].numpy(), actual[:n], pred[:n], titles))
        return metrics, picture

    def card(self, recipe, processor: dict) -> dict:
        return {"target": list(POINT), "output": "x, y: pixels of the input image as given",
                "input": {"mode": processor["mode"], "size": processor["size"],
                          "resize": processor["resize"]}}


def squared_error(pred, y):
    """(sum of squared errors, number of coordinates): MSE over x and y, as torch's MSELoss."""
    import torch
    return ((pred.double() - y.double()) ** 2).sum(), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                                    device=y.device)
