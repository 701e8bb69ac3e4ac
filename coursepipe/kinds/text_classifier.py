"""Text classification with ULMFiT (lessons 3-4): an AWD-LSTM encoder, taken from a fine-tuned
language model (`starts_from: models/<lm recipe>`), under a concat-pooling head, trained with
gradual unfreezing and discriminative learning rates.

The prepared table has one text per row (`text`), its label (schema.target, classes fixed by the
schema) and `duplicate`: "train" on a validation row whose text is also a training text. The
policy (prepare.duplicates) drops those rows from scoring, or fails prepare naming them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from coursepipe.config import ConfigError, Prepare, Section, Validate, positive
from coursepipe.contract import Evaluation, Kind, Spec
from coursepipe.data.split import seeded_order
from coursepipe.kinds.language_model import AWDLSTMModel, awd_encoder

TEXT, DUP = "text", "duplicate"
WRONG_CSV = "most_confident_wrong.csv"


@dataclass(frozen=True)
class TextPrepare(Prepare):
    duplicates: Literal["drop", "fail"]   # valid texts that are also training texts
    max_train: int | None                 # a seeded sample of the training texts (null: all)
    max_valid: int | None                 # ... of the validation texts: a CPU-sized run states its subset

    def __post_init__(self):
        super().__post_init__()
        for name in ("max_train", "max_valid"):
            n = getattr(self, name)
            if n is not None and n < 1:
                raise ConfigError(f"{name}: must be >= 1 or null (all), got {n}")


@dataclass(frozen=True)
class TextValidate(Validate):
    max_chars: int                        # a longer text is a broken extract (IMDB's longest: 13,704)


@dataclass(frozen=True)
class TextClassifierModel(AWDLSTMModel):
    """The encoder's fields as the language model's (they must match it), then the head and the
    gradual-unfreezing plan (the train section is shared by every kind, so the plan is here)."""
    lin_ftrs: tuple[int, ...]  # hidden sizes of the head (fastai: [50])
    head_ps: tuple[float, ...] # dropout before each head layer (fastai: [output_p, 0.1])
    max_len: int               # tokens at the end of a text that the backward pass reaches
    # gradual unfreezing: [epochs, lr] per step; step i trains the last i + 1 param groups
    # (head, then the LSTM layers from the top), the last step everything (freeze_to(-2), ...)
    unfreeze: tuple[tuple[float, float], ...]
    lr_decay: float            # each lower param group's lr is the next one's / lr_decay (2.6)

    def __post_init__(self):
        super().__post_init__()
        positive(self, "max_len")
        if len(self.head_ps) != len(self.lin_ftrs) + 1:
            raise ConfigError(f"head_ps: {len(self.lin_ftrs) + 1} dropouts for {len(self.lin_ftrs)} "
                              f"hidden layers + the output, got {self.head_ps}")
        if not self.unfreeze or any(len(s) != 2 or s[0] < 1 or s[1] <= 0 for s in self.unfreeze):
            raise ConfigError(f"unfreeze: expected [[epochs >= 1, lr > 0], ...], got {self.unfreeze}")
        if len(self.unfreeze) > self.n_layers + 2:
            raise ConfigError(f"unfreeze: {len(self.unfreeze)} steps for {self.n_layers + 2} param groups")
        if self.lr_decay < 1:
            raise ConfigError(f"lr_decay: must be >= 1, got {self.lr_decay}")


class TextClassification(Kind):
    name = "text_classification"
    portable = "coursepipe.export.portable_lm"   # one module: the tokenizer rules live there
    model_configs = (TextClassifierModel,)
    prepare_config = TextPrepare
    validate_config = TextValidate
    # torch.export bakes nn.LSTM's sequence length into a Reshape (a review of another length then
    # fails in onnxruntime); the TorchScript exporter emits ONNX's LSTM op with a dynamic length
    exporters = ("torchscript",)

    def check(self, recipe, cfg) -> None:
        if not recipe.schema.classes:
            raise ConfigError("schema: a text classifier needs its fixed classes")
        if cfg.upstream is None:
            raise ConfigError("starts_from: ULMFiT's classifier starts from a fine-tuned language "
                              "model: models/<its language-model recipe>")

    def prepare(self, recipe, df, p: TextPrepare):
        """The split, rows in a seeded random order, then texts of the validation rows that are
        also training texts marked (and counted in the report) or refused, as prepare.duplicates
        says."""
        import numpy as np

        out = super().prepare(recipe, df, p)
        rng = np.random.default_rng(p.seed)
        for valid, n in ((False, p.max_train), (True, p.max_valid)):
            rows = np.flatnonzero(out["is_valid"].to_numpy() == valid)
            if n is not None and len(rows) > n:
                out = out.drop(out.index[np.setdiff1d(rows, rng.choice(rows, n, replace=False))])
        # IMDB's layout lists a class at a time: the streaming path's local shuffle needs mixed rows
        out = seeded_order(out, p.seed)
        seen = set(out.loc[~out["is_valid"], TEXT])
        dup = out["is_valid"] & out[TEXT].isin(seen)
        if dup.any() and p.duplicates == "fail":
            first = out.loc[dup, TEXT].str.slice(0, 60).tolist()[:3]
            raise ValueError(f"{int(dup.sum())} validation texts are also training texts (e.g. "
                             f"{first}); prepare.duplicates: drop scores without them")
        out[DUP] = dup.map({True: "train", False: ""})
        return out

    def expectations(self, recipe, v: TextValidate) -> list[Spec]:
        return [("expect_column_value_lengths_to_be_between",
                 {"column": TEXT, "min_value": 1, "max_value": v.max_chars}),
                # the policy's report: always passes, counts and quotes the duplicates
                ("expect_column_values_to_be_in_set", {"column": DUP, "value_set": [""], "mostly": 0.0})]

    def usable(self, df):
        return df[df[DUP] == ""] if DUP in df.columns else df

    def fit_processor(self, recipe, train, m: TextClassifierModel) -> dict:
        """The training texts' own vocabulary: only for a classifier that starts from no language
        model (processor_from takes the LM's, without tokenising the texts for a vocabulary)."""
        from coursepipe.text.tokenizer import make_vocab, text_tokens
        return self._processor(recipe, make_vocab(text_tokens({"bos_each": True}, train[TEXT]),
                                                  m.min_freq, m.max_vocab))

    def processor_from(self, recipe, train, m: TextClassifierModel, upstream: dict) -> dict:
        """fastai's text_classifier_learner: the language model's vocabulary, so every word it
        learned (from unlabelled texts too) keeps its trained embedding instead of xxunk."""
        return self._processor(recipe, list(upstream["processor"]["itos"]))

    @staticmethod
    def _processor(recipe, itos: list[str]) -> dict:
        return {"task": "classify", "itos": itos, "text_column": TEXT,
                "classes": list(recipe.schema.classes), "target": recipe.schema.target}

    def _xy(self, processor: dict, df):
        import torch
        from coursepipe.text.classify import encode
        index = {c: i for i, c in enumerate(processor["classes"])}
        y = torch.tensor([index[v] for v in df[processor["target"]]], dtype=torch.long)
        return encode(processor["itos"], df[TEXT]), y

    def tensors(self, recipe, processor: dict, df) -> tuple:
        from coursepipe.text.classify import pad_id, pad_right
        ids, y = self._xy(processor, df)
        return pad_right(ids, pad_id(processor["itos"])), y

    def batches(self, recipe, processor: dict, df, m, bs: int, rank: int, world: int, seed: int,
                train: bool):
        from coursepipe.text.classify import TextBatches, pad_id
        ids, y = self._xy(processor, self.usable(df))  # tensors() keeps every row (export parity)
        return TextBatches(ids, y, pad_id(processor["itos"]), bs, rank, world, seed, train)

    # the streaming path: Ray Data's tasks tokenise; a rank pads each batch of similar lengths
    def heavy_columns(self, m) -> tuple[str, ...]:
        return (TEXT,)

    def processor_columns(self, m) -> tuple[str, ...]:
        # none: check() requires starts_from, and processor_from takes the language model's
        # vocabulary, so the driver reads no text (fit_processor's own vocabulary is never built)
        return ()

    def stream_rows(self, recipe, processor: dict, df) -> dict:
        from coursepipe.text.tokenizer import ragged
        ids, y = self._xy(processor, df)
        return {"t0": ragged(ids), "t1": y.numpy()}

    def stream_chunk(self, m) -> int:
        from coursepipe.text.classify import SORTISH_CHUNK
        return SORTISH_CHUNK

    def stream_batches(self, processor: dict, m, chunks, bs: int, rng):
        from coursepipe.text.classify import chunk_batches, pad_id
        pad = pad_id(processor["itos"])
        return (b for rows in chunks for b in chunk_batches(rows["t0"], rows["t1"], pad, bs, rng))

    def build_model(self, recipe, processor: dict, m: TextClassifierModel):
        from coursepipe.models.awd_lstm import TextClassifier
        from coursepipe.text.classify import pad_id
        pad = pad_id(processor["itos"])
        return TextClassifier(awd_encoder(len(processor["itos"]), pad, m), len(processor["classes"]),
                              m.lin_ftrs, m.head_ps, pad, m.seq_len, m.max_len)

    def start_from(self, recipe, m, model, processor: dict, upstream: dict) -> None:
        """The fine-tuned language model's encoder (fastai's load_encoder), embedding matched."""
        from coursepipe.models.awd_lstm import encoder_state
        up = upstream["model_config"]
        same = all(up.get(k) == getattr(m, k) for k in ("arch", "emb_sz", "n_hid", "n_layers"))
        if not same:
            raise ValueError(f"starts_from: the language model is {up.get('arch')} "
                             f"{up.get('emb_sz')}/{up.get('n_hid')}/{up.get('n_layers')} layers; "
                             f"this model section asks {m.arch} {m.emb_sz}/{m.n_hid}/{m.n_layers}")
        state = encoder_state(upstream["state_dict"], "encoder.", upstream["processor"]["itos"],
                              processor["itos"])
        model.encoder.load_state_dict(state)

    def splitter(self, m, model) -> list[list]:
        from coursepipe.models.awd_lstm import classifier_groups
        return classifier_groups(model)

    def plan(self, m: TextClassifierModel, t) -> list:
        """ULMFiT's gradual unfreezing: the head, then one more LSTM layer per step, then all, each
        a one-cycle at its lr spread down the groups by lr_decay per group (lr / 2.6^4 lowest)."""
        from coursepipe.learn.fine_tune import Phase
        groups = m.n_layers + 2
        steps = []
        for i, (epochs, lr) in enumerate(m.unfreeze):
            last = i == len(m.unfreeze) - 1
            n = 0 if last else -(i + 1)
            steps.append(Phase(int(epochs), (lr / m.lr_decay ** (groups - 1), lr), t.pct_start,
                               frozen=not last, freeze_to=n))
        return steps

    def loss_func(self, m):
        import torch
        return torch.nn.CrossEntropyLoss()

    def metrics(self, m) -> dict:
        from coursepipe.learn.loop import accuracy
        return {"accuracy": accuracy}

    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """Accuracy, loss, confusion matrix (PNG + CSV) and the most confidently wrong texts."""
        import numpy as np
        import pandas as pd
        import torch

        from coursepipe.io import write_bytes, write_text
        from coursepipe.learn.interpret import (CONFUSION_CSV, CONFUSION_PNG, classification_metrics,
                                                confusion_csv, confusion_matrix, plot_confusion)

        classes = run.processor["classes"]
        batches = self.batches(run.recipe, run.processor, run.valid, run.model_config,
                               run.config.bs, 0, 1, 0, False)
        order = np.concatenate(batches.plan(0))
        with torch.no_grad():
            logits = torch.cat([run.model(x).float() for x, _ in batches()])
        y = batches.y[order]
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        actual, predicted = y.numpy(), logits.argmax(1).numpy()
        metrics = {**classification_metrics(actual, predicted, classes), "valid_loss": loss,
                   "excluded_duplicates": int((run.valid[DUP] != "").sum())}
        cm = confusion_matrix(actual, predicted, len(classes))
        write_bytes(run.plots / CONFUSION_PNG, plot_confusion(
            cm, classes, title=f"{run.name}: confusion matrix (n={len(actual)})"))
        write_text(run.plots / CONFUSION_CSV, confusion_csv(actual, predicted, classes))
        prob = logits.softmax(1).numpy()
        valid = self.usable(run.valid).reset_index(drop=True).iloc[order]
        wrong = pd.DataFrame({"text": valid[TEXT].str.slice(0, 300).to_numpy(),
                              "actual": [classes[i] for i in actual],
                              "predicted": [classes[i] for i in predicted],
                              "probability": prob[np.arange(len(prob)), predicted]})
        wrong = wrong[wrong["actual"] != wrong["predicted"]].sort_values("probability", ascending=False)
        write_text(run.plots / WRONG_CSV, wrong.head(run.config.bs).to_csv(index=False))
        return metrics, run.plots / CONFUSION_PNG

    def export_axes(self, names: list[str]) -> dict[str, dict[int, str]]:
        return {n: {0: "batch", 1: "tokens"} for n in names}

    def card(self, recipe, processor: dict) -> dict:
        return {"target": processor["target"], "classes": list(processor["classes"]),
                "text_column": TEXT, "vocab_size": len(processor["itos"])}
