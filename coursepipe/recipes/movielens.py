"""movielens (lessons 4-5): predict the rating a user gives a movie by collaborative filtering.

Layouts: GroupLens ml-100k (ml-100k/u.data tab-separated user, item, rating, timestamp, no header;
ml-100k/u.item latin-1 `id|title|...`) and fastai's ML_SAMPLE (movie_lens_sample/ratings.csv with
userId,movieId,rating,timestamp, no titles). Both become columns user, item, rating, timestamp, title.
Course result: valid MSE 0.815 on ml-100k (dot product with biases, 40-50 factors, wd 0.1).
Here (ml-100k, seeded 10% split, 40 factors, 5 epochs, lr 5e-3, wd 0.1, 1 CPU thread, 1 run each):
bs 64 0.7923 in 12.4 s, bs 256 0.7956 in 3.9 s; fastai 2.8.12 collab_learner bs 64: 0.821 in 49.8 s.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from coursepipe.data.archive import deterministic_tgz

KIND = "collab"
PORTABLE = "coursepipe.export.portable_collab"
DATA_MEMBER = "ml-100k/u.data"
ITEM_MEMBER = "ml-100k/u.item"
SAMPLE_MEMBER = "movie_lens_sample/ratings.csv"
README_MEMBER = "ml-100k/README"
TARGET = "rating"
COLUMNS = ("user", "item", TARGET, "timestamp", "title")
CATEGORIES: dict[str, tuple[str, ...]] = {}
# MovieLens's documented scale: whole stars 1-5 in ml-100k, half stars 0.5-5 in later releases
# (ML_SAMPLE); timestamps are Unix seconds between 1970 and 2100.
RANGES: dict[str, tuple[float, float]] = {TARGET: (0.5, 5.0), "timestamp": (0, 4_102_444_800)}
ID_COLUMNS = ("user", "item")
ID_TYPES = ("int64", "int32", "Int64", "Int32")
WHOLE_NUMBER = r"^[0-9]+(?:\.0+)?$"  # str() of a non-negative whole number, int or float dtype
SAMPLE_RENAME = {"userId": "user", "movieId": "item"}


@dataclass(frozen=True)
class ModelConfig:
    """collab_learner: `dot` (EmbeddingDotBias) or `nn` (EmbeddingNN), ratings squashed into y_range."""
    arch: Literal["dot", "nn"] = "dot"
    n_factors: int = 50                       # dot: latent factors per user and item
    y_range: tuple[float, float] = (0.0, 5.5)  # sigmoid output range, a little past the top star
    nn_layers: tuple[int, ...] = (100,)       # nn: hidden widths after the concatenated embeddings
    nn_ps: tuple[float, ...] = (0.0,)         # nn: dropout after each hidden layer
    nn_emb_drop: float = 0.0
    unseen: Literal["allow", "error"] = "allow"  # valid users/items absent from the train split
    interpret_items: int = 1000               # evaluate: the most-rated items ranked / projected
    interpret_show: int = 15                  # evaluate: top and bottom items in item_bias.csv
    pca_labels: int = 50                      # evaluate: titles written on the PCA plot

    def __post_init__(self):
        from coursepipe.config import ConfigError
        if self.n_factors < 1:
            raise ConfigError(f"n_factors must be >= 1, got {self.n_factors}")
        if not self.y_range[0] < self.y_range[1]:
            raise ConfigError(f"y_range must be [low, high] with low < high, got {list(self.y_range)}")
        if len(self.nn_ps) != len(self.nn_layers):
            raise ConfigError(f"nn_ps has {len(self.nn_ps)} entries for {len(self.nn_layers)} layers")
        for name in ("interpret_items", "interpret_show", "pca_labels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- raw data

def read_ml100k(extracted: Path) -> pd.DataFrame:
    """u.data (+ u.item titles when present); ids kept as read so validation can name bad ones."""
    df = pd.read_csv(extracted / DATA_MEMBER, sep="\t", header=None, dtype=str,
                     names=["user", "item", TARGET, "timestamp"])
    items = extracted / ITEM_MEMBER
    if not items.is_file():
        df["title"] = None
        return df
    titles = pd.read_csv(items, sep="|", header=None, usecols=[0, 1], names=["item", "title"],
                         encoding="latin-1", dtype=str, quoting=3, keep_default_na=False)
    return df.merge(titles.drop_duplicates("item"), on="item", how="left")


def read_sample(extracted: Path) -> pd.DataFrame:
    """fastai's ratings.csv: userId,movieId,rating,timestamp; it has no titles."""
    df = pd.read_csv(extracted / SAMPLE_MEMBER, dtype=str).rename(columns=SAMPLE_RENAME)
    df["title"] = None
    return df


def read_raw(extracted: Path) -> pd.DataFrame:
    """Ratings from either layout, as columns user, item, rating, timestamp, title (strings)."""
    if (extracted / DATA_MEMBER).is_file():
        return read_ml100k(extracted)
    if (extracted / SAMPLE_MEMBER).is_file():
        return read_sample(extracted)
    found = sorted(str(p.relative_to(extracted)) for p in extracted.rglob("*") if p.is_file())[:5]
    raise FileNotFoundError(f"archive has neither {DATA_MEMBER} nor {SAMPLE_MEMBER} "
                            f"(files found: {found or 'none'})")


def id_column(values: pd.Series) -> pd.Series:
    """int64 when every id is a whole number; else float64 or the raw strings, which the
    suite's type and WHOLE_NUMBER rules then reject, quoting the bad ids."""
    x = pd.to_numeric(values, errors="coerce")
    if x.notna().all() and (x == x.round()).all():
        return x.astype("int64")
    if x.notna().all():
        return x.astype("float64")
    return values.astype("string")


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """Exactly COLUMNS: integer ids, float rating, int timestamp, title string or None."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise KeyError(f"ratings are missing column(s) {missing}; got {list(df.columns)}")
    out = pd.DataFrame({c: id_column(df[c]) for c in ID_COLUMNS})
    out[TARGET] = pd.to_numeric(df[TARGET], errors="coerce").astype("float64")
    out["timestamp"] = pd.to_numeric(df["timestamp"], errors="coerce").astype("float64")
    if out["timestamp"].notna().all():
        out["timestamp"] = out["timestamp"].astype("int64")
    title = df["title"].astype("object")
    out["title"] = title.where(title.notna(), None)
    return out


def split(df: pd.DataFrame, cfg) -> np.ndarray:
    """prepare's seeded random split, then the declared policy for valid ids unseen in training."""
    from coursepipe.stages.prepare import split_mask

    mask = split_mask(len(df), cfg.prepare.valid_pct, cfg.prepare.seed)
    report = unseen_report(df[~mask], df[mask])
    print(f"prepare@{cfg.name}: {describe_unseen(report)} (policy: {cfg.model.unseen}; "
          f"they map to the #na# embedding)", flush=True)
    if cfg.model.unseen == "error" and (report["users"] or report["items"]):
        raise ValueError(f"recipes.{cfg.name}.model.unseen=error: {describe_unseen(report)}")
    return mask


def unseen_report(train: pd.DataFrame, valid: pd.DataFrame, n: int = 5) -> dict:
    """Valid users / items absent from train: counts, rows affected and the first n ids of each."""
    out = {}
    for col, key in (("user", "users"), ("item", "items")):
        new = valid.loc[~valid[col].isin(set(train[col])), col]
        ids = sorted(new.unique().tolist(), key=id_order)
        out[key], out[f"{key}_rows"], out[f"{key}_examples"] = len(ids), int(len(new)), ids[:n]
    return out


def id_order(v) -> tuple:
    """Numbers in numeric order, then anything else (bad ids, before validation) as text."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def describe_unseen(r: dict) -> str:
    return (f"{r['users']} valid user(s) unseen in training ({r['users_rows']} rows) e.g. "
            f"{r['users_examples']}; {r['items']} valid item(s) unseen in training "
            f"({r['items_rows']} rows) e.g. {r['items_examples']}")


def extra_expectations(v) -> list[tuple[str, dict]]:
    """Whole-number ids, one rating per (user, item) pair."""
    specs: list[tuple[str, dict]] = []
    for col in ID_COLUMNS:
        specs.append(("expect_column_values_to_be_in_type_list",
                      {"column": col, "type_list": list(ID_TYPES)}))
        specs.append(("expect_column_values_to_match_regex", {"column": col, "regex": WHOLE_NUMBER}))
    specs.append(("expect_compound_columns_to_be_unique", {"column_list": list(ID_COLUMNS)}))
    return specs


# ----------------------------------------------------------------------------- synthetic sample

def synthetic_shape(rows: int) -> tuple[int, int]:
    """(users, items) at ml-100k's density (6.3%) and user:item ratio (943:1682)."""
    users = max(10, int(round((rows * 0.56 / 0.063) ** 0.5)))
    return users, max(10, int(round(users / 0.56)))


def synthesize(rows: int | None = None, seed: int = 0) -> bytes:
    """A SYNTHETIC ml-100k: rating = round(3.5 + user bias + item bias + u.i + noise) in 1..5.

    Item popularity is skewed (a few items get many ratings, as in MovieLens); titles say
    `(synthetic)` and a README member says how it was made. The noise floor is ~0.45 MSE; the
    default dot model reaches 0.52 at 100k rows, 0.81 at 10k (3 epochs).
    """
    rows = rows or 100_000
    rng = np.random.default_rng(seed)
    n_users, n_items = synthetic_shape(rows)
    rows = min(rows, n_users * n_items)
    # Gumbel top-k on log-weights: weighted sampling of distinct pairs without replacement
    pop = rng.lognormal(0.0, 1.0, n_items)
    act = rng.lognormal(0.0, 0.7, n_users)
    keys = np.log(np.outer(act, pop)).ravel() + rng.gumbel(size=n_users * n_items)
    pairs = np.sort(np.argpartition(-keys, rows - 1)[:rows])
    u, i = pairs // n_items, pairs % n_items
    k = 5  # true latent factors
    uf, itf = rng.normal(0, 0.5, (n_users, k)), rng.normal(0, 0.5, (n_items, k))
    ub, ib = rng.normal(0, 0.4, n_users), rng.normal(0, 0.5, n_items)
    score = 3.5 + ub[u] + ib[i] + (uf[u] * itf[i]).sum(1) + rng.normal(0, 0.6, rows)
    rating = np.clip(np.round(score), 1, 5).astype(int)
    ts = 874_724_710 + rng.integers(0, 20_000_000, rows)
    order = rng.permutation(rows)  # u.data is not sorted by user
    data = "".join(f"{a}\t{b}\t{r}\t{t}\n" for a, b, r, t in
                   zip(u[order] + 1, i[order] + 1, rating[order], ts[order]))
    genres = "|".join(["0"] * 19)
    items = "".join(f"{j}|Synthetic movie {j} (synthetic) ({1950 + j % 49})|01-Jan-1995||"
                    f"|{genres}\n" for j in range(1, n_items + 1))
    readme = (f"SYNTHETIC ratings in the GroupLens ml-100k layout, made by coursepipe "
              f"(recipes/movielens.py synthesize, rows={rows}, seed={seed}): {n_users} users, "
              f"{n_items} items, rating = round(3.5 + biases + 5 latent factors + noise) in 1..5.\n"
              f"Not MovieLens data.\n")
    return deterministic_tgz({DATA_MEMBER: data.encode(), ITEM_MEMBER: items.encode("latin-1"),
                              README_MEMBER: readme.encode()})


# ----------------------------------------------------------------------------- learner parts

def fit_processor(train: pd.DataFrame, model: ModelConfig) -> dict:
    """Vocabularies from the training rows (index 0 = #na#), plus titles and per-item statistics."""
    from coursepipe.export.portable_collab import NA

    users = sorted(int(v) for v in train["user"].unique())
    items = sorted(int(v) for v in train["item"].unique())
    stats = train.groupby("item")[TARGET].agg(["count", "mean"]).reindex(items)
    titles = train.drop_duplicates("item").set_index("item")["title"].reindex(items)
    return {"kind": KIND, "target": TARGET, "na": NA, "users": users, "items": items,
            "titles": [None if pd.isna(t) else str(t) for t in titles],
            "item_counts": [int(c) for c in stats["count"]],
            "item_means": [round(float(m), 6) for m in stats["mean"]],
            "rating_range": list(RANGES[TARGET]), "y_range": list(model.y_range)}


def tensors(processor: dict, df: pd.DataFrame):
    """(user indices, item indices, rating) tensors for the rows of df."""
    import torch
    from coursepipe.export.portable_collab import encode

    users, items = encode(processor, df)
    y = df[TARGET].to_numpy(np.float32).copy()
    return torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(y)


def build_model(processor: dict, model: ModelConfig):
    from coursepipe.models.collab import EmbeddingDotBias, EmbeddingNN

    n_users, n_items = len(processor["users"]) + 1, len(processor["items"]) + 1  # + #na#
    if model.arch == "dot":
        return EmbeddingDotBias(n_users, n_items, model.n_factors, model.y_range)
    return EmbeddingNN(n_users, n_items, model.y_range, layers=model.nn_layers, ps=model.nn_ps,
                       emb_drop=model.nn_emb_drop)


def splitter(model):
    from coursepipe.models.collab import splitter as split
    return split(model)


def loss_func():
    import torch
    return torch.nn.MSELoss()


def squared_error(pred, y):
    import torch
    return ((pred - y) ** 2).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)


def absolute_error(pred, y):
    import torch
    return (pred - y).abs().sum().double(), torch.tensor(float(len(y)), dtype=torch.float64, device=y.device)


def metrics() -> dict:
    return {"mse": squared_error, "mae": absolute_error}


# ----------------------------------------------------------------------------- interpretation

def item_scores(model, processor: dict) -> tuple[np.ndarray, str]:
    """Per-item score for the ranking (index 1..n): the learned bias for `dot`; for `nn`, which has
    none, the mean predicted rating over every training user."""
    import torch

    with torch.no_grad():
        if hasattr(model, "item_bias"):
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


BIAS_CSV = "item_bias.csv"
PCA_PNG = "item_pca.png"


def evaluate(model, recipe, processor: dict, valid: pd.DataFrame, bs: int, plots: Path, cfg):
    """Valid MSE/RMSE/MAE and unseen counts; item ranking CSV and item-factor PCA PNG in plots/."""
    from coursepipe.io import write_bytes, write_text
    from coursepipe.stages.evaluate import predict_logits

    users, items, y = tensors(processor, valid)
    pred = predict_logits(model, (users, items), bs).numpy()
    err = pred - y.numpy()
    mse = float((err ** 2).mean())
    m = cfg.model
    scores, score_name = item_scores(model, processor)
    ranking = bias_ranking(scores, processor, m.interpret_items, m.interpret_show, score_name)
    write_text(plots / BIAS_CSV, ranking.to_csv(index=False, float_format="%.6g"))
    pos = most_rated(processor, m.interpret_items)
    coords = pca2(model.item_factors().detach().numpy()[pos + 1])
    labels = [processor["titles"][p] or str(processor["items"][p]) for p in pos]
    write_bytes(plots / PCA_PNG, plot_pca(coords, labels, m.pca_labels,
                f"{cfg.name}: item factors, first two principal components ({len(pos)} most-rated items)"))
    return {"mse": mse, "rmse": mse ** 0.5, "mae": float(np.abs(err).mean()), "valid_loss": mse,
            "n_valid": int(len(y)), "n_unseen_user_rows": int((users == 0).sum()),
            "n_unseen_item_rows": int((items == 0).sum())}, plots / PCA_PNG
