"""Portable inference for an exported language model: numpy, pandas and onnxruntime only.

Copied into the export folder as predict.py, so `python export/<recipe>/predict.py "one hundred"`
predicts the next tokens of a prompt on a machine without this project. It must import nothing
from `coursepipe`. The tokenizer rules and numericalisation below are the ones training uses
(coursepipe/text imports them from here), so export and training cannot drift apart.

The exported graph maps token ids (B, T) to logits (B, T, V) (or (B, V) for the lesson's
"last step only" models), always from a zero recurrent state. A text classifier's export (state
`task: classify`, ULMFiT) maps right-padded ids (B, T) to class logits (B, C): `predict.py TEXT...`
or `predict.py FILE.csv` (its `text` column) prints each text's label and probability.
"""
from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

MODEL_FILE = "model.onnx"
STATE_FILE = "preprocessing.json"
METADATA_KEY = "preprocessing"  # model.onnx metadata_props entry holding the same JSON

# fastai's special tokens, in fastai's vocabulary order (defaults.text_spec_tok)
UNK, PAD, BOS, EOS, FLD, REP, WREP, UP, MAJ = (
    "xxunk", "xxpad", "xxbos", "xxeos", "xxfld", "xxrep", "xxwrep", "xxup", "xxmaj")
SPECIALS = (UNK, PAD, BOS, EOS, FLD, REP, WREP, UP, MAJ)
FAKE = "xxfake"  # fills the vocabulary to a multiple of 8, as fastai does

_RE_REP = re.compile(r"(\S)(\1{2,})")                                  # cccc -> xxrep 4 c
_RE_WREP = re.compile(r"(?:\s|^)(\w+)\s+((?:\1\s+)+)\1(\s|\W|$)")      # w w w -> xxwrep 3 w
_RE_SPEC = re.compile(r"([/#\\])")
_RE_SPACES = re.compile(" {2,}")
_RE_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")  # words (with an apostrophe part) or one symbol


# ----------------------------------------------------------------------------- fastai's text rules

def fix_html(t: str) -> str:
    """The HTML leftovers fastai cleans (IMDB's <br />, entities, ...)."""
    t = t.replace("#39;", "'").replace("amp;", "&").replace("#146;", "'").replace("nbsp;", " ")
    t = t.replace("#36;", "$").replace("\\n", "\n").replace("quot;", "'").replace("<br />", "\n")
    t = t.replace('\\"', '"').replace("<unk>", UNK).replace(" @.@ ", ".").replace(" @-@ ", "-")
    return html.unescape(t.replace("...", " …"))


def replace_rep(t: str) -> str:
    """A character repeated 3+ times becomes `xxrep n c`."""
    return _RE_REP.sub(lambda m: f" {REP} {len(m.group(2)) + 1} {m.group(1)} ", t)


def replace_wrep(t: str) -> str:
    """A word repeated 3+ times becomes `xxwrep n w`."""
    def sub(m):
        n = len(m.group(2).split()) + 2
        return f" {WREP} {n} {m.group(1)} {m.group(3)}"
    return _RE_WREP.sub(sub, t)


def spec_add_spaces(t: str) -> str:
    return _RE_SPEC.sub(r" \1 ", t)


def rm_useless_spaces(t: str) -> str:
    return _RE_SPACES.sub(" ", t)


def replace_all_caps(tokens: list[str]) -> list[str]:
    """`WORD` -> xxup word (words of 2+ letters)."""
    out = []
    for t in tokens:
        if t.isupper() and len(t) > 1:
            out += [UP, t.lower()]
        else:
            out.append(t)
    return out


def replace_maj(tokens: list[str]) -> list[str]:
    """`Word` -> xxmaj word."""
    out = []
    for t in tokens:
        if t[:1].isupper() and (len(t) == 1 or t[1:].islower()):
            out += [MAJ, t.lower()]
        else:
            out.append(t)
    return out


def tokenize(text: str, add_bos: bool = True) -> list[str]:
    """fastai's rules around a word splitter: string rules, split, then case markers + lowercase."""
    t = rm_useless_spaces(spec_add_spaces(replace_wrep(replace_rep(fix_html(text)))))
    tokens = _RE_WORD.findall(t)
    tokens = [w.lower() for w in replace_maj(replace_all_caps(tokens))]
    return [BOS, *tokens] if add_bos else tokens


def document(lines, sep: str) -> str:
    """Lines joined into one document the way the lesson does it: 'one , two , three'."""
    return f" {sep} ".join(str(s).strip() for s in lines)


def numericalize(tokens, itos) -> np.ndarray:
    """Token strings -> int64 ids; words outside the vocabulary become xxunk (id of UNK)."""
    index = {w: i for i, w in enumerate(itos)}
    unk = index[UNK]
    return np.fromiter((index.get(t, unk) for t in tokens), dtype=np.int64, count=len(tokens))


def text_tokens(state: dict, texts) -> list[str]:
    """A table's text column as training reads it: one document joined by `sep` (human_numbers),
    or with `bos_each` every text tokenised on its own, each starting with xxbos (fastai's LM
    corpus of reviews)."""
    if state.get("bos_each"):
        return [t for text in texts for t in tokenize(str(text))]
    return tokenize(document(texts, state["sep"]))


def stream(state: dict, texts) -> np.ndarray:
    """The id stream of a table's text column, as in training."""
    return numericalize(text_tokens(state, texts), state["itos"])


def windows(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive, non-overlapping (x, y) windows of seq_len tokens; y is x shifted by one."""
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1: n * seq_len + 1].reshape(n, seq_len)
    return x, y


# ----------------------------------------------------------------------------- the model

def load(export_dir: str | Path):
    """(onnxruntime session, state with the vocabulary) from an export folder."""
    import onnxruntime as ort

    export_dir = Path(export_dir)
    model = export_dir / MODEL_FILE
    if not model.is_file():
        raise FileNotFoundError(f"{model} is missing: run the export stage first")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    state_file = export_dir / STATE_FILE
    if state_file.is_file():
        state = json.loads(state_file.read_text())
    else:
        embedded = sess.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if embedded is None:
            raise FileNotFoundError(f"{state_file} is missing and {model} embeds no {METADATA_KEY!r}")
        state = json.loads(embedded)
    return sess, state


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def run_ids(sess, x: np.ndarray) -> np.ndarray:
    (logits,) = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.int64)})
    return logits


def pad_right(seqs: list[np.ndarray], pad_id: int) -> np.ndarray:
    """(B, longest) int64, each row its ids then pad_id."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), pad_id, np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def padded(state: dict, texts) -> np.ndarray:
    """A classifier's input: each text's ids (xxbos first), right-padded with xxpad."""
    return pad_right([numericalize(tokenize(str(t)), state["itos"]) for t in texts],
                     state["itos"].index(PAD))


def classify(sess, state: dict, texts, bs: int = 16) -> np.ndarray:
    """Class probabilities (N, C), texts of similar lengths batched together."""
    texts = [str(t) for t in texts]
    order = np.argsort([-len(t) for t in texts], kind="stable")
    probs = np.zeros((len(texts), len(state["classes"])))
    for i in range(0, len(texts), bs):
        idx = order[i:i + bs]
        probs[idx] = softmax(run_ids(sess, padded(state, [texts[j] for j in idx])))
    return probs


def outputs(sess, state: dict, df: pd.DataFrame) -> np.ndarray:
    """What parity compares: next-token probabilities for the windows of the rows' stream, or a
    classifier's class probabilities for each row."""
    if state.get("task") == "classify":
        return softmax(run_ids(sess, padded(state, df[state["text_column"]])))
    x, _ = windows(stream(state, df[state["text_column"]]), state["seq_len"])
    return softmax(run_ids(sess, x))


def finish(raw: np.ndarray, state: dict) -> np.ndarray:
    """The same numbers from the PyTorch model's logits."""
    return softmax(raw)


def graph_length(sess) -> int | None:
    """The token axis length the graph was exported with, or None when it is dynamic."""
    dim = sess.get_inputs()[0].shape[1]
    return dim if isinstance(dim, int) else None


def prompt_ids(state: dict, prompt: str, length: int | None) -> np.ndarray:
    """A prompt's ids, cut to the graph's window (the last `length` tokens) or left-padded.

    The graph starts from a zero state, so only the window is context; padding is xxpad."""
    ids = numericalize(tokenize(prompt), state["itos"])
    if length is None:
        return ids
    if len(ids) >= length:
        return ids[-length:]
    return np.concatenate([np.full(length - len(ids), state["itos"].index(PAD), np.int64), ids])


def predict_next(sess, state: dict, prompt: str, n: int = 1) -> tuple[list[str], list[float]]:
    """Greedy continuation: the n most likely next tokens, one at a time, and their probabilities."""
    itos, length = state["itos"], graph_length(sess)
    text, words, probs = prompt, [], []
    for _ in range(n):
        p = softmax(run_ids(sess, prompt_ids(state, text, length)[None]))
        p = p[0, -1] if p.ndim == 3 else p[0]
        i = int(p.argmax())
        words.append(itos[i])
        probs.append(float(p[i]))
        text = f"{text} {itos[i]}"
    return words, probs


def predict_frame(export_dir: str | Path, df: pd.DataFrame, n: int = 1) -> pd.DataFrame:
    """`df` (a `text` column of prompts) with the predicted next tokens and the first's
    probability; a classifier's: each text's label and its probability."""
    sess, state = load(export_dir)
    col = state["text_column"]
    if col not in df.columns:
        raise KeyError(f"input has no {col!r} column; columns: {list(df.columns)}")
    if state.get("task") == "classify":
        probs = classify(sess, state, df[col])
        out = df.copy()
        out["prediction"] = [state["classes"][i] for i in probs.argmax(1)]
        out["probability"] = probs.max(1)
        return out
    preds = [predict_next(sess, state, str(t), n) for t in df[col]]
    out = df.copy()
    out["prediction"] = [" ".join(w) for w, _ in preds]
    out["probability"] = [p[0] for _, p in preds]
    return out


def write_csv(df: pd.DataFrame, dest) -> None:
    """portable_csv.write_csv, from the file beside this one (coursepipe/export/ or the export
    folder, where it is copied): loaded by path, so predict.py needs no package on sys.path."""
    import importlib.util

    path = Path(__file__).resolve().parent / "portable_csv.py"
    spec = importlib.util.spec_from_file_location("portable_csv", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_csv(df, dest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    n = 1
    if len(argv) >= 2 and argv[0] in ("-n", "--n"):
        n, argv = int(argv[1]), argv[2:]
    if not argv:
        print("usage: predict.py [-n N] PROMPT... | ROWS.csv   (a classifier: TEXT... | TEXTS.txt, one a line"
              " | ROWS.csv with a text column; reads this folder's model)", file=sys.stderr)
        return 2
    here = Path(__file__).resolve().parent
    try:
        if len(argv) == 1 and argv[0].endswith(".csv"):
            out = predict_frame(here, pd.read_csv(argv[0]), n)
            write_csv(out, sys.stdout)
        else:
            sess, state = load(here)
            if state.get("task") == "classify":  # each argument is one text, or a .txt file of them
                if len(argv) == 1 and argv[0].endswith(".txt") and Path(argv[0]).is_file():
                    argv = [line for line in Path(argv[0]).read_text(encoding="utf-8").splitlines() if line.strip()]
                for text, p in zip(argv, classify(sess, state, argv)):
                    print(f"{state['classes'][int(p.argmax())]}\t{p.max():.3f}\t{text[:60]}")
                return 0
            words, probs = predict_next(sess, state, " ".join(argv), n)
            print(" ".join(words), f"(p={probs[0]:.3f})")
    except (KeyError, FileNotFoundError) as e:
        print(f"predict.py: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
