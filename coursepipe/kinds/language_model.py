"""Language models (lesson 7): predict the next token of a text stream.

The prepared table has one text per row (schema.target is the text column); the training rows,
tokenised with fastai's rules and joined with `sep`, make one stream, cut into bs contiguous rows
that a stateful RNN reads bptt tokens at a time (fastai's LMDataLoader). Models: the lesson's RNN
ladder up to a 2-layer GRU (coursepipe/models/rnn.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coursepipe.config import ConfigError, Section, positive
from coursepipe.contract import Evaluation, Kind


@dataclass(frozen=True)
class LMModel(Section):
    """The lesson's models (arch) and the language-model data they read."""
    arch: str                  # rnn3 | rnn_loop | rnn_seq | rnn_stateful | nn_rnn | gru
    nh: int                    # hidden size
    n_layers: int              # GRU layers (nn_rnn uses 1, as in the lesson)
    seq_len: int               # bptt: tokens per batch (rnn3 always reads 3)
    bptt_jitter: bool          # fastai v1's random batch lengths (train only)
    p_half: float              # jitter: chance a batch is centred on seq_len / 2
    jitter_std: float          # jitter: normal spread of the length, tokens
    min_len: int               # jitter: shortest batch, tokens
    sep: str                   # token between texts (the course notebook's ', ' join)
    min_freq: int              # vocabulary: rarer words become xxunk
    max_vocab: int

    def __post_init__(self):
        from coursepipe.models.rnn import ARCHS
        if self.arch not in ARCHS:
            raise ConfigError(f"arch: {self.arch!r} is not one of {list(ARCHS)}")
        positive(self, "nh", "n_layers", "seq_len", "min_len", "min_freq", "max_vocab")
        if self.arch == "rnn3" and self.seq_len != 3:
            raise ConfigError(f"seq_len must be 3 for arch rnn3 (three tokens in), got {self.seq_len}")


class LanguageModel(Kind):
    name = "language_model"
    portable = "coursepipe.export.portable_lm"
    model_configs = (LMModel,)

    def fit_processor(self, recipe, train, m: LMModel) -> dict:
        """The vocabulary of the training document, and what the export needs to rebuild windows."""
        from coursepipe.models.rnn import LAST_STEP
        from coursepipe.text.tokenizer import document, make_vocab, tokenize

        text = recipe.schema.target
        itos = make_vocab(tokenize(document(train[text], m.sep)), m.min_freq, m.max_vocab)
        return {"itos": itos, "sep": m.sep, "text_column": text,
                "seq_len": 3 if m.arch == "rnn3" else m.seq_len,
                "arch": m.arch, "last_step": m.arch in LAST_STEP}

    def tensors(self, recipe, processor: dict, df) -> tuple:
        """(x, y): consecutive windows of the rows' token stream, each (N, seq_len) int64."""
        import torch
        from coursepipe.text.tokenizer import stream, windows

        x, y = windows(stream(processor, df[processor["text_column"]]), processor["seq_len"])
        return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())

    def batches(self, recipe, processor: dict, df, m: LMModel, bs: int, rank: int, world: int,
                seed: int, train: bool):
        """Contiguous LM streams: each rank reads its own slice of the stream (not interleaved rows)."""
        import torch
        from coursepipe.text.lm_data import Jitter, LMBatches
        from coursepipe.text.tokenizer import stream

        ids = torch.from_numpy(stream(processor, df[processor["text_column"]]))
        # jitter only where the model reads any length (not the fixed-window rnn3 / rnn_loop)
        jitter = Jitter(m.p_half, m.jitter_std, m.min_len) \
            if train and m.bptt_jitter and not processor["last_step"] else None
        return LMBatches(ids, bs, processor["seq_len"], rank, world, seed,
                         jitter=jitter, full_only=processor["last_step"])

    def build_model(self, recipe, processor: dict, m: LMModel):
        from coursepipe.models.rnn import build
        return build(m.arch, len(processor["itos"]), m.nh, m.n_layers)

    def loss_func(self, m):
        from coursepipe.models.rnn import lm_loss
        return lm_loss

    def metrics(self, m) -> dict:
        from coursepipe.models.rnn import lm_accuracy
        return {"accuracy": lm_accuracy}

    def callbacks(self, recipe, m: LMModel, t) -> list:
        """Stateful models: carry the state across batches, forgotten at each epoch and validation."""
        from coursepipe.models.rnn import STATEFUL
        from coursepipe.text.callbacks import ResetState
        return [ResetState()] if m.arch in STATEFUL else []

    def evaluate(self, run: Evaluation) -> tuple[dict, Path]:
        """Next-token accuracy, loss, perplexity (stateful streams of evaluate.bs rows, as the
        training loop validates with train.valid_bs) + accuracy by window position (PNG)."""
        from coursepipe.text.evaluate import evaluate_lm

        m, bs = run.model_config, run.config.bs
        batches = self.batches(run.recipe, run.processor, run.valid, m, bs, 0, 1, 0, False)
        return evaluate_lm(run.model, run.processor, batches,
                           self.tensors(run.recipe, run.processor, run.valid), run.plots,
                           title=f"{run.name} ({m.arch})", bs=bs)

    def card(self, recipe, processor: dict) -> dict:
        return {"target": "next token", "text_column": processor["text_column"],
                "vocab_size": len(processor["itos"]), "seq_len": processor["seq_len"]}
