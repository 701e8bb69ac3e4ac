"""Collaborative filtering (lessons 4-5): a rating from a (user, item) pair, by embeddings.

The prepared table has integer `user` and `item` ids, the rating (schema.target, its scale in
schema.ranges) and an optional `title` per item. Models: EmbeddingDotBias (`dot`) or EmbeddingNN
(`nn`), squashed into y_range. Evaluate adds lesson 5's interpretation: items ranked by their
learned bias and the item factors' first two principal components.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from coursepipe.config import ConfigError, Evaluate, Prepare, Section, positive
from coursepipe.contract import Evaluation, Kind, Spec

ID_COLUMNS = ("user", "item")
ID_TYPES = ("int64", "int32", "Int64", "Int32")
WHOLE_NUMBER = r"^[0-9]+(?:\.0+)?$"  # str() of a non-negative whole number, int or float dtype
BIAS_CSV = "item_bias.csv"
PCA_PNG = "item_pca.png"


@dataclass(frozen=True)
class CollabPrepare(Prepare):
    unseen: Literal["allow", "error"]   # valid users/items absent from the train split


@dataclass(frozen=True)
class CollabEvaluate(Evaluate):
    interpret_items: int                # the most-rated items ranked and projected
    interpret_show: int                 # top and bottom items written to item_bias.csv
    pca_labels: int                     # titles drawn on item_pca.png

    def __post_init__(self):
        super().__post_init__()
        positive(self, "interpret_items", "interpret_show", "pca_labels")


@dataclass(frozen=True)
class CollabModel(Section):
    """collab_learner: `dot` (EmbeddingDotBias) or `nn` (EmbeddingNN), ratings squashed into y_range."""
    arch: Literal["dot", "nn"]
    n_factors: int                      # dot: latent factors per user and item
    y_range: tuple[float, float]        # sigmoid output range, a little past the top star
    nn_layers: tuple[int, ...]          # nn: hidden widths after the concatenated embeddings
    nn_ps: tuple[float, ...]            # nn: dropout after each hidden layer
    nn_emb_drop: float

    def __post_init__(self):
        positive(self, "n_factors")
        if not self.y_range[0] < self.y_range[1]:
            raise ConfigError(f"y_range must be [low, high] with low < high, got {list(self.y_range)}")
        if len(self.nn_ps) != len(self.nn_layers):
            raise ConfigError(f"nn_ps has {len(self.nn_ps)} entries for {len(self.nn_layers)} layers")


# ----------------------------------------------------------------------------- unseen ids

def id_order(v) -> tuple:
    """Numbers in numeric order, then anything else (bad ids, before validation) as text."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def unseen_report(train: pd.DataFrame, valid: pd.DataFrame, n: int = 5) -> dict:
    """Valid users / items absent from train: counts, rows affected and the first n ids of each."""
    out = {}
    for col, key in (("user", "users"), ("item", "items")):
        new = valid.loc[~valid[col].isin(set(train[col])), col]
        ids = sorted(new.unique().tolist(), key=id_order)
        out[key], out[f"{key}_rows"], out[f"{key}_examples"] = len(ids), int(len(new)), ids[:n]
    return out


def describe_unseen(r: dict) -> str:
    return (f"{r['users']} valid user(s) unseen in training ({r['users_rows']} rows) e.g. "
            f"{r['users_examples']}; {r['items']} valid item(s) unseen in training "
            f"({r['items_rows']} rows) e.g. {r['items_examples']}")


# ----------------------------------------------------------------------------- interpretation

def item_scores(model, processor: dict) -> tuple[np.ndarray, str]:
    """Per-item score for the ranking (index 1..n): the learned bias for `dot`; for `nn`, which has
    none, the mean predicted rating over every training user."""
    import torch

    with torch.no_grad():
        if hasattr(model, "item_bias"):  # a model class, not a recipe hook: EmbeddingDotBias
            return model.item_bias().numpy()[1:], "bias"
        n_items, users = len(processor["items"]), torch.arange(1, len(processor["users"]) + 1)
        rows = [model(users, torch.full_like(users, j)).mean() for j in range(1, n_items + 1)]
        return torch.stack(rows).numpy(), "mean_prediction"


def most_rated(processor: dict, n: int) -> np.ndarray:
    """Positions (0-based into processor['items']) of the n most-rated training items."""
    return np.argsort(-np.asarray(processor["item_counts"]), kind="stable")[:n]


def bias_ranking(scores: np.ndarray, processor: dict, n_items: int, n_show: int,
                 score_name: str) -> pd.DataFrame:
    """The n_show highest- and lowest-scored of the n_items most-rated items, with titles."""
    pos = most_rated(processor, n_items)
    df = pd.DataFrame({"item": np.asarray(processor["items"])[pos],
                       "title": [processor["titles"][p] for p in pos],
                       score_name: scores[pos].round(6),
                       "n_ratings": np.asarray(processor["item_counts"])[pos],
                       "mean_rating": np.asarray(processor["item_means"])[pos]})
    df = df.sort_values(score_name, ascending=False, kind="stable").reset_index(drop=True)
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    df.insert(0, "end", "top")
    bottom = df.tail(min(n_show, max(len(df) - n_show, 0))).iloc[::-1].assign(end="bottom")
    return pd.concat([df.head(n_show), bottom], ignore_index=True)


def pca2(x: np.ndarray) -> np.ndarray:
    """The rows of x projected on their first two principal components."""
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def plot_pca(coords: np.ndarray, labels: list[str], n_labels: int, title: str, dpi: int = 100) -> bytes:
    """Items on PC1/PC2; the first n_labels (the most-rated) carry their titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 12), dpi=dpi)
    FigureCanvasAgg(fig)  # a private Agg canvas: no pyplot, no global backend switch
    ax = fig.add_subplot()
    ax.scatter(coords[:, 0], coords[:, 1], s=6, alpha=0.3, color="tab:blue")
    for (x, y), text in list(zip(coords, labels))[:n_labels]:
        ax.text(x, y, text, fontsize=8)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ----------------------------------------------------------------------------- the kind

def squared_error(pred, y):
    import torch
    return ((pred - y) ** 2).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)


def absolute_error(pred, y):
    import torch
    return (pred - y).abs().sum().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)


class Collab(Kind):
    name = "collab"
    portable = "coursepipe.export.portable_collab"
    model_configs = (CollabModel,)
    prepare_config = CollabPrepare
    evaluate_config = CollabEvaluate

    def prepare(self, recipe, df, p: CollabPrepare):
        """The seeded random split, then the declared policy for valid ids unseen in training."""
        out = super().prepare(recipe, df, p)
        report = unseen_report(out[~out["is_valid"]], out[out["is_valid"]])
        print(f"prepare@{recipe.name}: {describe_unseen(report)} (policy: {p.unseen}; "
              f"they map to the #na# embedding)", flush=True)
        if p.unseen == "error" and (report["users"] or report["items"]):
            raise ValueError(f"recipes.{recipe.name}.prepare.unseen=error: {describe_unseen(report)}")
        return out

    def expectations(self, recipe, v) -> list[Spec]:
        """Whole-number ids, one rating per (user, item) pair."""
        specs: list[Spec] = []
        for col in ID_COLUMNS:
            specs.append(("expect_column_values_to_be_in_type_list",
                          {"column": col, "type_list": list(ID_TYPES)}))
            specs.append(("expect_column_values_to_match_regex", {"column": col, "regex": WHOLE_NUMBER}))
        specs.append(("expect_compound_columns_to_be_unique", {"column_list": list(ID_COLUMNS)}))
        return specs

    def fit_processor(self, recipe, train, m: CollabModel) -> dict:
        """Vocabularies from the training rows (index 0 = #na#), plus titles and per-item statistics."""
        from coursepipe.export.portable_collab import NA

        target = recipe.schema.target
        users = sorted(int(v) for v in train["user"].unique())
        items = sorted(int(v) for v in train["item"].unique())
        stats = train.groupby("item")[target].agg(["count", "mean"]).reindex(items)
        titles = train.drop_duplicates("item").set_index("item")["title"].reindex(items)
        return {"kind": self.name, "target": target, "na": NA, "users": users, "items": items,
                "titles": [None if pd.isna(t) else str(t) for t in titles],
                "item_counts": [int(c) for c in stats["count"]],
                "item_means": [round(float(m), 6) for m in stats["mean"]],
                "rating_range": list(recipe.schema.ranges[target]), "y_range": list(m.y_range)}

    def tensors(self, recipe, processor: dict, df) -> tuple:
        """(user indices, item indices, rating) tensors for the rows of df."""
        import torch
        from coursepipe.export.portable_collab import encode

        users, items = encode(processor, df)
        y = df[processor["target"]].to_numpy(np.float32).copy()
        return torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(y)

    def build_model(self, recipe, processor: dict, m: CollabModel):
        from coursepipe.models.collab import EmbeddingDotBias, EmbeddingNN

        n_users, n_items = len(processor["users"]) + 1, len(processor["items"]) + 1  # + #na#
        if m.arch == "dot":
            return EmbeddingDotBias(n_users, n_items, m.n_factors, m.y_range)
        return EmbeddingNN(n_users, n_items, m.y_range, layers=m.nn_layers, ps=m.nn_ps,
                           emb_drop=m.nn_emb_drop)

    def splitter(self, m, model) -> list[list]:
        from coursepipe.models.collab import splitter
        return splitter(model)

    def loss_func(self, m):
        import torch
        return torch.nn.MSELoss()

    def metrics(self, m) -> dict:
        return {"mse": squared_error, "mae": absolute_error}

    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """Valid MSE/RMSE/MAE and unseen counts; item ranking CSV and item-factor PCA PNG."""
        from coursepipe.io import write_bytes, write_text
        from coursepipe.learn.infer import predict_logits

        e, processor, model = run.config, run.processor, run.model
        users, items, y = self.tensors(run.recipe, processor, run.valid)
        pred = predict_logits(model, (users, items), e.bs).numpy()
        err = pred - y.numpy()
        mse = float((err ** 2).mean())
        scores, score_name = item_scores(model, processor)
        ranking = bias_ranking(scores, processor, e.interpret_items, e.interpret_show, score_name)
        write_text(run.plots / BIAS_CSV, ranking.to_csv(index=False, float_format="%.6g"))
        pos = most_rated(processor, e.interpret_items)
        coords = pca2(model.item_factors().detach().numpy()[pos + 1])
        labels = [processor["titles"][p] or str(processor["items"][p]) for p in pos]
        write_bytes(run.plots / PCA_PNG, plot_pca(coords, labels, e.pca_labels,
                    f"{run.name}: item factors, first two principal components ({len(pos)} most-rated items)"))
        return {"mse": mse, "rmse": mse ** 0.5, "mae": float(np.abs(err).mean()), "valid_loss": mse,
                "n_valid": int(len(y)), "n_unseen_user_rows": int((users == 0).sum()),
                "n_unseen_item_rows": int((items == 0).sum())}, run.plots / PCA_PNG

    def card(self, recipe, processor: dict) -> dict:
        return {"target": processor["target"], "input_columns": list(ID_COLUMNS),
                "rating_range": processor["rating_range"]}
