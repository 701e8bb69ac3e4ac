"""Lesson 7's language models, built up step by step (course-v3 lesson7-human-numbers, Model0-5).

Every model maps token ids x (B, T) to logits: (B, V) for the two "last step only" models,
(B, T, V) for the others. Stateful models carry their hidden state from one batch to the next
only while `carry` is on (a training callback turns it on and calls reset() at each epoch start
and before validation); with `carry` off, as after loading, forward() starts from a zero state,
which is the stateless function the ONNX export holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHS = ("rnn3", "rnn_loop", "rnn_seq", "rnn_stateful", "nn_rnn", "gru")
LAST_STEP = ("rnn3", "rnn_loop")               # predict only the token after the window
STATEFUL = ("rnn_stateful", "nn_rnn", "gru")   # hidden state carried across batches


class BatchNormFlat(nn.BatchNorm1d):
    """BatchNorm1d over the last axis of (B, T, C) (fastai's BatchNorm1dFlat)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        b, t, c = x.shape
        return super().forward(x.reshape(b * t, c)).reshape(b, t, c)


class StateMixin:
    """A hidden state kept between batches while `carry` is on; reset() forgets it."""
    carry: bool = False
    h: torch.Tensor | None = None

    def reset(self) -> None:
        self.h = None

    def initial(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The carried state when it fits this batch, else zeros (start, eval, export)."""
        if self.carry and self.h is not None and tuple(self.h.shape) == shape:
            return self.h
        return like.new_zeros(shape)

    def keep(self, h: torch.Tensor) -> None:
        if self.carry:  # detach: backprop through bptt tokens only (truncated BPTT)
            self.h = h.detach()


class Rnn3(nn.Module):
    """Model0: three tokens in, the fourth out; the same three layers applied at each step."""

    def __init__(self, vocab: int, nh: int):
        super().__init__()
        self.i_h, self.h_h, self.h_o = nn.Embedding(vocab, nh), nn.Linear(nh, nh), nn.Linear(nh, vocab)
        self.bn = nn.BatchNorm1d(nh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(F.relu(self.h_h(self.i_h(x[:, 0]))))      # (B, nh)
        h = self.bn(F.relu(self.h_h(h + self.i_h(x[:, 1]))))
        h = self.bn(F.relu(self.h_h(h + self.i_h(x[:, 2]))))
        return self.h_o(h)                                      # (B, V)


class RnnLoop(nn.Module):
    """Model1: the same as a loop over any number of tokens, still predicting only the last."""

    def __init__(self, vocab: int, nh: int):
        super().__init__()
        self.i_h, self.h_h, self.h_o = nn.Embedding(vocab, nh), nn.Linear(nh, nh), nn.Linear(nh, vocab)
        self.bn = nn.BatchNorm1d(nh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros((x.shape[0], self.h_h.in_features), dtype=torch.float32)
        for i in range(x.shape[1]):
            h = self.bn(F.relu(self.h_h(h + self.i_h(x[:, i]))))
        return self.h_o(h)


class RnnSeq(StateMixin, nn.Module):
    """Model2 / Model3: an output at every step; Model3 (stateful) keeps h between batches."""

    def __init__(self, vocab: int, nh: int, stateful: bool):
        super().__init__()
        self.i_h, self.h_h, self.h_o = nn.Embedding(vocab, nh), nn.Linear(nh, nh), nn.Linear(nh, vocab)
        self.bn = BatchNormFlat(nh)
        self.stateful = stateful

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.initial((x.shape[0], self.h_h.in_features), self.h_o.weight) if self.stateful \
            else self.h_o.weight.new_zeros((x.shape[0], self.h_h.in_features))
        res = []
        for i in range(x.shape[1]):
            h = F.relu(self.h_h(h + self.i_h(x[:, i])))
            res.append(h)
        if self.stateful:
            self.keep(h)
        return self.h_o(self.bn(torch.stack(res, 1)))  # (B, T, V)


class TorchRnn(StateMixin, nn.Module):
    """Model4 (nn.RNN) / Model5 (nn.GRU, 2 layers): PyTorch's recurrent layers, stateful."""

    def __init__(self, vocab: int, nh: int, n_layers: int, cell: str):
        super().__init__()
        self.i_h, self.h_o = nn.Embedding(vocab, nh), nn.Linear(nh, vocab)
        self.rnn = (nn.GRU if cell == "gru" else nn.RNN)(nh, nh, n_layers, batch_first=True)
        self.bn = BatchNormFlat(nh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.initial((self.rnn.num_layers, x.shape[0], self.rnn.hidden_size), self.h_o.weight)
        res, h = self.rnn(self.i_h(x), h)                  # (B, T, nh), (layers, B, nh)
        self.keep(h)
        return self.h_o(self.bn(res))                      # (B, T, V)


def build(arch: str, vocab: int, nh: int, n_layers: int) -> nn.Module:
    """The lesson's model named by `arch` (see ARCHS)."""
    if arch == "rnn3":
        return Rnn3(vocab, nh)
    if arch == "rnn_loop":
        return RnnLoop(vocab, nh)
    if arch in ("rnn_seq", "rnn_stateful"):
        return RnnSeq(vocab, nh, stateful=arch == "rnn_stateful")
    if arch in ("nn_rnn", "gru"):
        return TorchRnn(vocab, nh, n_layers if arch == "gru" else 1, cell=arch)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def set_carry(model: nn.Module, on: bool) -> None:
    """Turn state carrying on/off and forget the state (DDP-wrapped or not)."""
    model = getattr(model, "module", model)
    if isinstance(model, StateMixin):
        model.carry = on
        model.reset()


def flat(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits and (N,) targets; a last-step model is scored on the window's last target."""
    if pred.dim() == 2 and y.dim() == 2:
        y = y[:, -1]
    return pred.reshape(-1, pred.shape[-1]), y.reshape(-1)


def lm_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every predicted token."""
    return F.cross_entropy(*flat(pred, y))


def lm_accuracy(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct tokens, tokens) so ranks can add them up."""
    p, t = flat(pred, y)
    return (p.argmax(-1) == t).sum().double(), torch.tensor(float(len(t)), dtype=torch.float64,
                                                             device=t.device)
