"""AWD-LSTM (Merity et al. 2017) as fastai builds it for ULMFiT (lessons 3-4): a language model and
a classifier that share one encoder.

Regularisation, each scaled by the model section's `drop_mult` as fastai's `awd_lstm_lm_config`:
embedding dropout (whole words), a weight-dropped hidden-to-hidden matrix in every LSTM layer,
variational (same mask at every step) dropout on the embedded input, between layers and on the
output. The LM's decoder shares the embedding's weights (tied).

The classifier runs the encoder over a review in chunks of `bptt` tokens, carrying the state
(fastai's SentenceEncoder), and pools the last layer's outputs over the review's tokens (concat
pooling: last, max, mean) into a two-layer head. Reviews are right-padded: an LSTM reads left to
right, so padding after a review never changes its outputs, and a batch's padding cannot change
a review's prediction (the export and a batch of one agree). Chunks before the last `max_len`
tokens run without gradients (fastai keeps only the last max_len outputs for the backward pass).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coursepipe.models.rnn import StateMixin


def dropout_mask(like: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """A Bernoulli(1-p) mask scaled by 1/(1-p), the same for every step of a sequence."""
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


class RNNDropout(nn.Module):
    """Variational dropout: one mask per sequence and feature, shared over time."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # (B, T, C)
        if not self.training or self.p == 0:
            return x
        return x * dropout_mask(x, (x.shape[0], 1, x.shape[2]), self.p)


class EmbeddingDropout(nn.Module):
    """Drop whole words: rows of the embedding matrix, rescaled (fastai's EmbeddingDropout)."""

    def __init__(self, emb: nn.Embedding, p: float):
        super().__init__()
        self.p = p
        object.__setattr__(self, "emb", emb)  # not a submodule: the weights are the encoder's, once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.emb.weight
        if self.training and self.p:
            w = w * dropout_mask(w, (w.shape[0], 1), self.p)
        return F.embedding(x, w, self.emb.padding_idx)


class WeightDropLSTM(nn.Module):
    """One LSTM layer whose hidden-to-hidden weights are dropped per batch (DropConnect).

    torch.func.functional_call swaps the dropped matrix in for one call, so the module stays a
    plain nn.LSTM: its state_dict, its cuDNN path and its ONNX export are the standard ones."""

    def __init__(self, n_in: int, n_out: int, p: float):
        super().__init__()
        self.lstm, self.p = nn.LSTM(n_in, n_out, batch_first=True), p

    def forward(self, x: torch.Tensor, h: tuple[torch.Tensor, torch.Tensor]):
        if not self.training or self.p == 0:
            return self.lstm(x, h)
        w = F.dropout(self.lstm.weight_hh_l0, self.p, training=True)
        return torch.func.functional_call(self.lstm, {"weight_hh_l0": w}, (x, h))


class AWDLSTM(StateMixin, nn.Module):
    """The encoder: ids (B, T) -> the last layer's outputs (B, T, emb_sz).

    The state is carried between calls while `carry` is on (LM training streams; the classifier's
    chunks), else each call starts from zeros."""

    def __init__(self, vocab: int, emb_sz: int, n_hid: int, n_layers: int, pad_id: int,
                 embed_p: float, weight_p: float, input_p: float, hidden_p: float,
                 embed_init: float = 0.1):
        super().__init__()
        self.emb_sz, self.n_hid, self.n_layers = emb_sz, n_hid, n_layers
        self.encoder = nn.Embedding(vocab, emb_sz, padding_idx=pad_id)
        self.encoder.weight.data.uniform_(-embed_init, embed_init)   # fastai's initrange: 0.1
        self.encoder_dp = EmbeddingDropout(self.encoder, embed_p)
        sizes = [emb_sz] + [n_hid] * (n_layers - 1) + [emb_sz]
        self.rnns = nn.ModuleList(WeightDropLSTM(sizes[i], sizes[i + 1], weight_p)
                                  for i in range(n_layers))
        self.input_dp = RNNDropout(input_p)
        self.hidden_dps = nn.ModuleList(RNNDropout(hidden_p) for _ in range(n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.input_dp(self.encoder_dp(x))
        states = self.h if self.carry and self.h is not None and self.h[0][0].shape[1] == x.shape[0] \
            else None
        new = []
        for i, (rnn, dp) in enumerate(zip(self.rnns, self.hidden_dps)):
            n = rnn.lstm.hidden_size
            h = states[i] if states is not None else (out.new_zeros(1, x.shape[0], n),) * 2
            out, (hn, cn) = rnn(out, h)
            new.append((hn.detach(), cn.detach()))
            if i < self.n_layers - 1:
                out = dp(out)
        if self.carry:
            self.h = new
        return self.hidden_dps[-1](out) if self.training else out


class LMHead(nn.Module):
    """Output dropout and a decoder whose weights are the embedding's (tied)."""

    def __init__(self, encoder: AWDLSTM, output_p: float):
        super().__init__()
        self.output_dp = RNNDropout(output_p)
        self.decoder = nn.Linear(encoder.emb_sz, encoder.encoder.num_embeddings)
        self.decoder.weight = encoder.encoder.weight
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.output_dp(x))


class AWDLanguageModel(StateMixin, nn.Module):
    """ids (B, T) -> next-token logits (B, T, V). StateMixin's carry is forwarded to the encoder
    (coursepipe.models.rnn.set_carry finds this module)."""

    def __init__(self, encoder: AWDLSTM, output_p: float):
        super().__init__()
        self.encoder, self.head = encoder, LMHead(encoder, output_p)

    def reset(self) -> None:
        self.encoder.reset()

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "carry" and "encoder" in self._modules:
            self.encoder.carry = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def masked_concat_pool(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[last, max, mean] of each sequence's real positions: (B, T, C), (B, T) -> (B, 3C)."""
    lengths = mask.sum(1).clamp(min=1)
    last = out[torch.arange(out.shape[0], device=out.device), lengths - 1]
    m = mask.unsqueeze(-1)
    mx = out.masked_fill(~m, float("-inf")).max(1).values
    mean = (out * m).sum(1) / lengths.unsqueeze(-1).to(out.dtype)
    return torch.cat([last, mx, mean], 1)


class TextClassifier(nn.Module):
    """ids (B, T), right-padded with pad_id -> class logits (B, n_classes)."""

    def __init__(self, encoder: AWDLSTM, n_classes: int, lin_ftrs: list[int], ps: list[float],
                 pad_id: int, bptt: int, max_len: int):
        super().__init__()
        self.encoder, self.pad_id, self.bptt, self.max_len = encoder, pad_id, bptt, max_len
        sizes = [encoder.emb_sz * 3, *lin_ftrs, n_classes]
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.BatchNorm1d(n_in), nn.Dropout(ps[i]), nn.Linear(n_in, n_out)]
            if i < len(sizes) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.head = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's outputs over the whole review: in bptt chunks with the state carried
        while training (memory bounded by max_len for the backward pass); in one call otherwise,
        which is the same function (an LSTM over the concatenation == chunks with state carried)."""
        enc = self.encoder
        if not self.training:
            enc.carry = False
            return enc(x)
        enc.carry, enc.h = True, None
        outs, T = [], x.shape[1]
        try:
            for i in range(0, T, self.bptt):
                grad = i + self.bptt > T - self.max_len
                with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                    outs.append(enc(x[:, i:i + self.bptt]))
        finally:
            enc.carry, enc.h = False, None
        return torch.cat(outs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x != self.pad_id
        return self.head(masked_concat_pool(self.encode(x), mask))


def lm_groups(model: AWDLanguageModel) -> list[list[nn.Parameter]]:
    """fastai's awd_lstm_lm_split: one group per LSTM layer, then embedding + decoder (tied)."""
    enc = model.encoder
    return [list(r.parameters()) for r in enc.rnns] + \
        [list(enc.encoder.parameters()) + [model.head.decoder.bias]]


def classifier_groups(model: TextClassifier) -> list[list[nn.Parameter]]:
    """fastai's awd_lstm_clas_split: embedding, each LSTM layer, the head; freeze_to(-2) trains
    the head and the last LSTM layer."""
    enc = model.encoder
    return [list(enc.encoder.parameters())] + [list(r.parameters()) for r in enc.rnns] + \
        [list(model.head.parameters())]


def match_embeds(weight: torch.Tensor, old_itos: list[str], new_itos: list[str]) -> torch.Tensor:
    """Rows of a trained embedding re-ordered for a new vocabulary (fastai's match_embeds): a word
    both know keeps its row, a new word gets the mean row."""
    index = {w: i for i, w in enumerate(old_itos)}
    mean = weight.mean(0)
    rows = [weight[index[w]] if w in index else mean for w in new_itos]
    return torch.stack(rows)


def lm_state(state: dict, old_itos: list[str], new_itos: list[str]) -> dict:
    """An AWD-LSTM language model's state_dict for a new vocabulary: the embedding, the tied
    decoder and its bias matched by word."""
    state = dict(state)
    for key in ("encoder.encoder.weight", "head.decoder.weight"):
        state[key] = match_embeds(state[key], old_itos, new_itos)
    state["head.decoder.bias"] = match_embeds(state["head.decoder.bias"][:, None], old_itos, new_itos)[:, 0]
    return state


def encoder_state(state: dict, prefix: str, old_itos: list[str], new_itos: list[str]) -> dict:
    """The encoder's weights from a state_dict (keys under `prefix`), embedding matched to new_itos."""
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out["encoder.weight"] = match_embeds(out["encoder.weight"], old_itos, new_itos)
    return out
