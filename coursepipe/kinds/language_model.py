"""Language models (lesson 7): predict the next token of a text stream.

The prepared table has one text per row (schema.target is the text column); the training rows,
tokenised with fastai's rules and joined with `sep`, make one stream, cut into bs contiguous rows
that a stateful RNN reads bptt tokens at a time (fastai's LMDataLoader). Models: the lesson's RNN
ladder up to a 2-layer GRU (coursepipe/models/rnn.py), and ULMFiT's AWD-LSTM
(coursepipe/models/awd_lstm.py) over a corpus of texts that each start with xxbos (IMDB reviews).
An AWD-LSTM recipe may start from another recipe's trained language model (`starts_from`, the
pretrain -> fine-tune step of ULMFiT): its weights are loaded with the embedding rows matched to
this recipe's vocabulary by word (fastai's match_embeds).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coursepipe.config import ConfigError, Section, positive
from coursepipe.contract import Evaluation, Kind

TEXT = "text"  # the corpus recipes' text column (the streaming path's heavy column)


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


@dataclass(frozen=True)
class AWDLSTMModel(Section):
    """ULMFiT's language model (fastai's awd_lstm_lm_config; the course: 400 / 1152 / 3 layers)."""
    arch: str                  # awd_lstm
    emb_sz: int                # embedding size (also the last LSTM layer's, for tied weights)
    n_hid: int                 # hidden size of the inner LSTM layers
    n_layers: int
    drop_mult: float           # scales every dropout below (ULMFiT: 0.3 for the LM)
    embed_p: float             # whole words dropped from the embedding
    weight_p: float            # hidden-to-hidden weights dropped (DropConnect)
    input_p: float             # variational dropout on the embedded input
    hidden_p: float            # ... between LSTM layers
    output_p: float            # ... before the decoder
    # the embedding's (and tied decoder's) init, uniform(-embed_init, embed_init). fastai's 0.1 sat
    # at the unigram for a CPU budget's first thousand steps from scratch (docs/RESULTS.md, imdb)
    embed_init: float
    seq_len: int               # bptt
    min_freq: int              # vocabulary: rarer words become xxunk
    max_vocab: int

    def __post_init__(self):
        if self.arch != "awd_lstm":
            raise ConfigError(f"arch: {self.arch!r}: this section is the AWD-LSTM's (awd_lstm)")
        positive(self, "emb_sz", "n_hid", "n_layers", "seq_len", "min_freq", "max_vocab")
        if not self.embed_init > 0:
            raise ConfigError(f"embed_init: the embedding's uniform init range must be > 0, got {self.embed_init}")
        for name in ("drop_mult", "embed_p", "weight_p", "input_p", "hidden_p", "output_p"):
            p = getattr(self, name)
            if not 0 <= p < (10 if name == "drop_mult" else 1):
                raise ConfigError(f"{name}: {p} is not a dropout probability")

    def ps(self) -> dict:
        """The dropouts as the model takes them, each scaled by drop_mult."""
        return {k: getattr(self, k) * self.drop_mult
                for k in ("embed_p", "weight_p", "input_p", "hidden_p", "output_p")}


@dataclass(frozen=True)
class PretrainedAWDLSTM(AWDLSTMModel):
    """ULMFiT's first step: the AWD-LSTM LM, optionally starting from fastai-format pretrained
    weights (the course's WikiText-103: `wt103-fwd.tgz`), then trained on the configured corpus."""
    weights: str               # none | https://... (downloaded once, sha256-checked) | a local file
    weights_sha256: str | None
    weights_cache: str         # where downloads are kept
    weights_timeout_s: float   # a download that stalls this long fails

    def __post_init__(self):
        super().__post_init__()
        if self.weights not in ("", "none") and self.weights.startswith(("http://", "https://")) \
                and not self.weights_sha256:
            raise ConfigError("weights_sha256: a downloaded weights file needs its sha256")


def awd_encoder(vocab: int, pad_id: int, m) -> "object":
    """The AWD-LSTM encoder of a model section (an LM's, or the classifier's encoder fields)."""
    from coursepipe.models.awd_lstm import AWDLSTM
    p = m.ps()
    return AWDLSTM(vocab, m.emb_sz, m.n_hid, m.n_layers, pad_id, p["embed_p"], p["weight_p"],
                   p["input_p"], p["hidden_p"], m.embed_init)


class LanguageModel(Kind):
    name = "language_model"
    portable = "coursepipe.export.portable_lm"
    model_configs = (LMModel, AWDLSTMModel, PretrainedAWDLSTM)

    def fit_processor(self, recipe, train, m) -> dict:
        """The vocabulary of the training document, and what the export needs to rebuild windows."""
        from collections import Counter

        from coursepipe.models.rnn import LAST_STEP
        from coursepipe.text.tokenizer import make_vocab, text_tokens, tokenize, vocab_of

        text = recipe.schema.target
        if isinstance(m, AWDLSTMModel):  # a corpus of texts, each its own xxbos document
            # counted text by text: the driver of a streaming run fits this, and a list of every
            # token of a 25M-token corpus would be GBs of str objects
            counts, n = Counter(), 0
            for doc in train[text]:
                tokens = tokenize(str(doc))
                counts.update(tokens)
                n += len(tokens)
            return {"bos_each": True, "sep": "", "itos": vocab_of(counts, m.min_freq, m.max_vocab),
                    "text_column": text, "seq_len": m.seq_len, "arch": m.arch, "last_step": False,
                    "train_tokens": n}  # the training stream's length (stream_steps)
        itos = make_vocab(text_tokens({"sep": m.sep}, train[text]), m.min_freq, m.max_vocab)
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
            if train and getattr(m, "bptt_jitter", False) and not processor["last_step"] else None
        return LMBatches(ids, bs, processor["seq_len"], rank, world, seed,
                         jitter=jitter, full_only=processor["last_step"])

    # the streaming path (train.data_path: ray_data), for corpora of texts (AWD-LSTM): Ray Data's
    # tasks tokenise each text; a rank fills its bs / world rows with whole texts as they arrive
    # (text/lm_data.lane_batches); rank 0 scores the validation split as the memory path does.
    # Not the lesson's models: human_numbers is one document whose order is the data, and a
    # shuffle of its rows would be another task.
    def check(self, recipe, cfg) -> None:
        if cfg.train.data_path == "ray_data" and isinstance(cfg.model, AWDLSTMModel) \
                and recipe.schema.target != TEXT:
            raise ConfigError(f"train.data_path: ray_data streams the text column {TEXT!r}; this "
                              f"recipe's texts are in {recipe.schema.target!r} (use memory)")

    def heavy_columns(self, m) -> tuple[str, ...]:
        return (TEXT,) if isinstance(m, AWDLSTMModel) else ()

    def processor_columns(self, m) -> tuple[str, ...]:
        return (TEXT,)  # the vocabulary and the stream's length, from the training texts

    def stream_rows(self, recipe, processor: dict, df) -> dict:
        from coursepipe.text.tokenizer import encode, ragged
        return {"t0": ragged(encode(processor["itos"], df[processor["text_column"]]))}

    def stream_chunk(self, m) -> int:
        from coursepipe.text.lm_data import TEXTS_PER_ROW
        return TEXTS_PER_ROW

    def stream_steps(self, processor: dict, m, rows: int, bs: int, world: int) -> int:
        from coursepipe.text.lm_data import lane_steps
        return lane_steps(processor["train_tokens"], bs, processor["seq_len"])

    def stream_batches(self, processor: dict, m, chunks, bs: int, rng):
        import numpy as np
        import torch
        from coursepipe.text.lm_data import LMBatches, lane_batches
        texts = (ids for rows in chunks for ids in rows["t0"])
        if rng is not None:
            return lane_batches(texts, bs, processor["seq_len"])
        # scoring, on rank 0: the split's stream cut as the memory path and evaluate cut it (filled
        # rows would leave up to a text per row unscored: a third of the IMDB sample's tokens)
        return LMBatches(torch.from_numpy(np.concatenate(list(texts))), bs, processor["seq_len"])(0)

    def build_model(self, recipe, processor: dict, m):
        if isinstance(m, AWDLSTMModel):
            from coursepipe.models.awd_lstm import AWDLanguageModel
            from coursepipe.text.tokenizer import PAD
            itos = processor["itos"]
            model = AWDLanguageModel(awd_encoder(len(itos), itos.index(PAD), m), m.ps()["output_p"])
            model.itos = itos  # a plain attribute (not saved): pretrained rows are matched to it
            return model
        from coursepipe.models.rnn import build
        return build(m.arch, len(processor["itos"]), m.nh, m.n_layers)

    def splitter(self, m, model) -> list[list]:
        """AWD-LSTM: one group per LSTM layer, then embedding + decoder (fastai's LM split)."""
        if isinstance(m, AWDLSTMModel):
            from coursepipe.models.awd_lstm import lm_groups
            return lm_groups(model)
        return [list(model.parameters())]

    def start_from(self, recipe, m, model, processor: dict, upstream: dict) -> None:
        """ULMFiT's fine-tune step: another AWD-LSTM language model's weights, its embedding
        (and the tied decoder) matched to this vocabulary by word, the decoder bias likewise."""
        from coursepipe.models.awd_lstm import lm_state
        if not isinstance(m, AWDLSTMModel) or upstream["processor"].get("arch") != "awd_lstm":
            raise ValueError("starts_from: only an AWD-LSTM language model can start from another "
                             "recipe's model, and only from an AWD-LSTM language model")
        model.load_state_dict(lm_state(upstream["state_dict"], upstream["processor"]["itos"],
                                       processor["itos"]))

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
        cbs = [ResetState()] if m.arch in STATEFUL or m.arch == "awd_lstm" else []
        if isinstance(m, PretrainedAWDLSTM) and m.weights not in ("", "none"):
            from coursepipe.text.pretrained import LoadPretrainedLM
            cbs.append(LoadPretrainedLM(m.weights, m.weights_cache, m.weights_sha256, m.weights_timeout_s))
        return cbs

    def prefetch(self, m) -> None:
        """On the driver, before Ray starts: download and check the pretrained LM once."""
        if isinstance(m, PretrainedAWDLSTM) and m.weights not in ("", "none"):
            from coursepipe.models.transfer import resolve
            from coursepipe.text.pretrained import read_fastai_lm
            read_fastai_lm(resolve(m.weights, m.weights_cache, m.weights_sha256, m.weights_timeout_s))

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
