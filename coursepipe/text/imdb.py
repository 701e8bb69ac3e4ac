"""IMDB layouts and the offline sample shared by ULMFiT's three recipes (imdb_pretrain, imdb_lm, imdb).

Layouts read (fastai's URLs):
- IMDB_SAMPLE: `imdb_sample/texts.csv` (`label,text,is_valid`); any CSV of `label,text[,is_valid]`
  with other label names reads the same way.
- IMDB: `imdb/{train,test}/{pos,neg}/<id>_<rating>.txt` and `imdb/unsup/*.txt` (aclImdb); the
  classifier validates on `test/`, as the course does.
Every text is read as UTF-8; a file that is not names itself.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from dataclasses import dataclass

from coursepipe.config import ConfigError, Prepare
from coursepipe.data.archive import deterministic_tgz

LABELS = {"pos": "positive", "neg": "negative"}
PARTS = ("train", "test", "unsup")


def read_text(path: Path, root: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path.relative_to(root)}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def read_folders(top: Path, root: Path) -> pd.DataFrame:
    """aclImdb: one row per review file: text, label ('' for unsup), part, file."""
    rows = []
    for part in PARTS:
        for folder, label in ((("pos", "positive"), ("neg", "negative")) if part != "unsup" else (("", ""),)):
            d = top / part / folder if folder else top / part
            for f in sorted(d.glob("*.txt")):
                rows.append((read_text(f, root), label, part, str(f.relative_to(root))))
    return pd.DataFrame(rows, columns=["text", "label", "part", "file"])


def read_csv(path: Path, root: Path) -> pd.DataFrame:
    """label,text[,is_valid] -> the same columns as read_folders (valid rows are part 'test')."""
    df = pd.read_csv(io.StringIO(read_text(path, root)), dtype={"label": str, "text": str})
    missing = [c for c in ("label", "text") if c not in df.columns]
    if missing:
        raise KeyError(f"{path.relative_to(root)}: no column {missing[0]!r} (columns: {list(df.columns)})")
    valid = df["is_valid"].astype(str).str.lower().isin(["true", "1"]) if "is_valid" in df.columns \
        else pd.Series(False, index=df.index)
    return pd.DataFrame({"text": df["text"].fillna(""), "label": df["label"].fillna(""),
                         "part": np.where(valid, "test", "train"),
                         "file": f"{path.relative_to(root)}:" + (df.index + 2).astype(str)})


def read_any(extracted: Path) -> pd.DataFrame:
    """Whichever layout the archive holds: text, label, part (train | test | unsup), file."""
    tops = [p for p in extracted.iterdir() if p.is_dir()] or [extracted]
    for top in tops:
        if (top / "train").is_dir():
            return read_folders(top, extracted)
        csvs = sorted(top.glob("*.csv"))
        if csvs:
            return read_csv(csvs[0], extracted)
    found = sorted(str(p.relative_to(extracted)) for p in extracted.rglob("*"))[:8]
    raise FileNotFoundError(f"archive holds neither imdb/{{train,test}}/{{pos,neg}}/*.txt nor a "
                            f"texts.csv (found: {found or 'nothing'})")


@dataclass(frozen=True)
class CorpusPrepare(Prepare):
    """A language model's corpus: at most max_texts of its texts (a seeded sample; null: all),
    so a CPU-sized run states the subset it trained on."""
    max_texts: int | None

    def __post_init__(self):
        super().__post_init__()
        if self.max_texts is not None and self.max_texts < 1:
            raise ConfigError(f"max_texts: must be >= 1 or null (all), got {self.max_texts}")


def lm_corpus(df: pd.DataFrame, parts: tuple[str, ...], max_texts: int | None = None,
              seed: int = 0) -> tuple[pd.DataFrame, int]:
    """(the language model's texts, how many were dropped): the texts of `parts` that are not also
    texts of the classifier's evaluation split (`test`), each once; a seeded sample of max_texts."""
    held_out = set(df.loc[df["part"] == "test", "text"])
    take = df[df["part"].isin(parts)]
    overlap = take["text"].isin(held_out)
    corpus = take[~overlap].drop_duplicates("text")
    if max_texts is not None and len(corpus) > max_texts:
        corpus = corpus.iloc[np.sort(np.random.default_rng(seed).choice(len(corpus), max_texts, replace=False))]
    return corpus.reset_index(drop=True), int(overlap.sum())


CORPUS_COLUMNS = ("text", "part")


def read_corpus(extracted: Path, p: CorpusPrepare, parts: tuple[str, ...], name: str) -> pd.DataFrame:
    """A language model's corpus from any IMDB layout, logging what it kept and dropped."""
    df = read_any(extracted)
    if "unsup" in parts and not (df["part"] == "unsup").any():
        parts = tuple(x for x in parts if x != "unsup") or ("train",)  # a CSV has no unsup texts
    corpus, dropped = lm_corpus(df, parts, p.max_texts, p.seed)
    print(f"{name}: {len(corpus)} texts of {parts}; {dropped} dropped (also evaluation texts)")
    return corpus


def normalise_corpus(df: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"text": df["text"].astype(str), "part": df["part"].astype(str)})


def corpus_expectations(v) -> list:
    return [("expect_column_value_lengths_to_be_between", {"column": "text", "min_value": 1})]


# ----------------------------------------------------------------------------- the offline sample

GOOD = ("wonderful", "brilliant", "moving", "superb", "delightful", "gripping", "charming", "great")
BAD = ("awful", "boring", "dull", "terrible", "clumsy", "tedious", "lifeless", "bad")
NOUNS = ("film", "movie", "plot", "cast", "script", "ending", "score", "story", "director")
FILLER = ("the", "a", "this", "that", "was", "is", "really", "quite", "and", "but", "with", "I",
          "thought", "found", "watched", "it", "at", "times", "overall")


def review(rng: np.random.Generator, positive: bool | None) -> str:
    """A review of filler words and nouns with sentiment words mostly of its label (some of the
    other, so the task is not trivial); None: an unlabelled review (either)."""
    if positive is None:
        positive = bool(rng.random() < 0.5)
    words = []
    for _ in range(int(rng.integers(20, 90))):
        r = rng.random()
        if r < 0.12:
            mine = rng.random() < 0.8
            words.append(str(rng.choice(GOOD if mine == positive else BAD)))
        elif r < 0.3:
            words.append(str(rng.choice(NOUNS)))
        else:
            words.append(str(rng.choice(FILLER)))
    text = " ".join(words)
    return text[0].upper() + text[1:] + ". <br /><br />" + ("Loved it!" if positive else "Skip it.")


def synthesize(rows: int | None, seed: int) -> bytes:
    """aclImdb's layout, small: rows reviews each in train/{pos,neg}, test/{pos,neg} and 2*rows in unsup."""
    n = rows or 250
    rng = np.random.default_rng(seed)
    files = {}
    for part in ("train", "test"):
        for folder, positive in (("pos", True), ("neg", False)):
            for i in range(n):
                files[f"imdb/{part}/{folder}/{i}_{8 if positive else 2}.txt"] = review(rng, positive).encode()
    for i in range(2 * n):
        files[f"imdb/unsup/{i}_0.txt"] = review(rng, None).encode()
    return deterministic_tgz(files)
