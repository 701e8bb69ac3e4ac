"""ULMFiT's classifier vs a tf-idf baseline on the same texts, and the tokenizer's throughput.

    python bench/imdb.py tokens --archive ../shared/data/imdb_full.tgz         # tokens/s
    python bench/imdb.py score --root R --seeds 42 1 2 \\
        --extra ../shared/data/imdb_full.tgz --extra-n 5000                      # classifier vs tf-idf

`tokens`: fastai's rules + word split as the pipeline runs them (coursepipe/export/portable_lm.py,
Python regexes) vs Hugging Face `tokenizers`' Rust pre-tokenizer alone (no fastai rules), on the
same unsup/ reviews, one process: tokens/s of each.

`score`: R is a project root whose `imdb` recipe is prepared and validated and whose `imdb_lm` is
trained (`dvc repro validate@imdb train@imdb_lm`). For each seed it trains the classifier with
R's params in-process through `coursepipe.learn.program.train` (the function every Ray worker
runs) starting from R's models/imdb_lm, then scores it on (1) R's validation texts and (2) with
--extra, `--extra-n` texts of that archive's test/ that are not among R's texts (seeded sample).
A scikit-learn tf-idf (1–2-grams) logistic regression, fitted on the same training texts, is scored
on the same texts. Prints every number from this one run.
"""
from __future__ import annotations

import argparse
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np


def unsup_texts(archive: str, n: int) -> list[str]:
    out = []
    with tarfile.open(archive) as tf:
        for m in tf:
            if "/unsup/" in m.name and m.isfile():
                out.append(tf.extractfile(m).read().decode("utf-8"))
                if len(out) == n:
                    break
    return out


def cmd_tokens(args) -> None:
    from tokenizers import pre_tokenizers

    from coursepipe.export.portable_lm import tokenize

    texts = unsup_texts(args.archive, args.texts)
    t0 = time.perf_counter()
    n = sum(len(tokenize(t)) for t in texts)
    ours = time.perf_counter() - t0
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    t0 = time.perf_counter()
    m = sum(len(pre.pre_tokenize_str(t)) for t in texts)
    hf = time.perf_counter() - t0
    print(f"{len(texts)} reviews, {n / len(texts):.0f} tokens each")
    print(f"fastai rules + split (the pipeline's): {n / ours:,.0f} tokens/s")
    print(f"HF tokenizers pre-tokenizer alone:     {m / hf:,.0f} tokens/s (no fastai rules)")
    print(f"ratio pipeline / HF = {(n / ours) / (m / hf):.2f}")


def extra_texts(archive: str, exclude: set[str], n: int, seed: int):
    from coursepipe.text import imdb

    with tempfile.TemporaryDirectory() as d:
        with tarfile.open(archive) as tf:
            tf.extractall(d, members=[m for m in tf if "/test/" in m.name or m.isdir()], filter="data")
        df = imdb.read_any(Path(d))
    df = df[(df["part"] == "test") & ~df["text"].isin(exclude)]
    pick = np.random.default_rng(seed).choice(len(df), size=min(n, len(df)), replace=False)
    return df.iloc[np.sort(pick)].reset_index(drop=True)


def tfidf_accuracy(train, evals: dict) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(max_iter=2000, C=4.0).fit(vec.fit_transform(train["text"]), train["label"])
    return {k: float((clf.predict(vec.transform(df["text"])) == df["label"]).mean()) for k, df in evals.items()}


def model_accuracy(recipe, processor, model, df, bs: int) -> float:
    import torch

    kind = recipe.kind
    b = kind.batches(recipe, processor, df.assign(duplicate=""), None, bs, 0, 1, 0, False)
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in b())
    return hits / len(df)


def cmd_score(args) -> None:
    from coursepipe import recipes
    from coursepipe.config import evolve
    from coursepipe.learn import program
    from coursepipe.paths import Paths
    from coursepipe.stages import prepare, train

    paths = Paths(args.root)
    cfg, recipe = recipes.load_params(paths.params).recipe("imdb"), recipes.get("imdb")
    frame = prepare.load(paths, "imdb")
    tr, va = frame[~frame["is_valid"]], recipe.kind.usable(frame[frame["is_valid"]])
    evals = {"valid": va}
    if args.extra:
        evals[f"extra{args.extra_n}"] = extra_texts(args.extra, set(frame["text"]), args.extra_n, 0)
    up = train.read_bundle(train.upstream_model(paths, cfg))
    print(f"imdb: {len(tr)} train texts; scored on " +
          ", ".join(f"{k} ({len(v)} texts)" for k, v in evals.items()))
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        out = program.train(recipe, cfg.model, evolve(cfg.train, seed=seed), frame,
                            program.Hooks(show=False, upstream=up))
        secs = time.perf_counter() - t0
        acc = {k: model_accuracy(recipe, out.parts.processor, out.parts.model, df, cfg.evaluate.bs)
               for k, df in evals.items()}
        runs.append(acc)
        print(f"ULMFiT classifier, seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
              + f" ({secs:.0f} s)", flush=True)
    base = tfidf_accuracy(tr, evals)
    for k in evals:
        mean = float(np.mean([r[k] for r in runs])) if runs else float("nan")
        print(f"{k}: ULMFiT mean of {len(runs)} seeds {mean:.4f} vs tf-idf LR {base[k]:.4f} "
              f"(difference {mean - base[k]:+.4f})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokens")
    t.add_argument("--archive", required=True)
    t.add_argument("--texts", type=int, default=3000)
    s = sub.add_parser("score")
    s.add_argument("--root", default=".")
    s.add_argument("--seeds", type=int, nargs="*", default=[42])
    s.add_argument("--extra", help="an aclImdb archive whose test/ texts are also scored")
    s.add_argument("--extra-n", type=int, default=5000)
    args = ap.parse_args(argv)
    {"tokens": cmd_tokens, "score": cmd_score}[args.cmd](args)


if __name__ == "__main__":
    main()
