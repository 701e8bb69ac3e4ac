"""fastai's collaborative-filtering models: EmbeddingDotBias (lesson 4) and EmbeddingNN (lesson 5).

Both take (user index, item index) int64 vectors, index 0 being #na# (unseen at training time),
and return a rating of shape (B,) squashed into y_range by a sigmoid.
"""
from __future__ import annotations

import torch
from torch import nn

from coursepipe.models.tabular import emb_sz_rule


def embedding(n: int, dim: int) -> nn.Embedding:
    """fastai's Embedding: truncated normal init with std 0.01 (small factors train stably)."""
    e = nn.Embedding(n, dim)
    with torch.no_grad():
        nn.init.trunc_normal_(e.weight, std=0.01, a=-0.02, b=0.02)
    return e


def sigmoid_range(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return torch.sigmoid(x) * (hi - lo) + lo


class EmbeddingDotBias(nn.Module):
    """rating = sigmoid_range(u . i + b_u + b_i): latent factors plus per-user and per-item biases."""

    def __init__(self, n_users: int, n_items: int, n_factors: int, y_range: tuple[float, float]):
        super().__init__()
        self.y_range = tuple(float(v) for v in y_range)
        self.u_weight, self.i_weight = embedding(n_users, n_factors), embedding(n_items, n_factors)
        self.u_bias, self.i_bias = embedding(n_users, 1), embedding(n_items, 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        dot = (self.u_weight(user) * self.i_weight(item)).sum(1)
        res = dot + self.u_bias(user).squeeze(1) + self.i_bias(item).squeeze(1)
        return sigmoid_range(res, *self.y_range)

    def item_factors(self) -> torch.Tensor:
        return self.i_weight.weight

    def item_bias(self) -> torch.Tensor:
        return self.i_bias.weight.squeeze(1)


class EmbeddingNN(nn.Module):
    """rating = sigmoid_range(MLP([user embedding, item embedding])), widths by fastai's rule."""

    def __init__(self, n_users: int, n_items: int, y_range: tuple[float, float],
                 layers=(100,), ps=(0.0,), emb_drop: float = 0.0, use_bn: bool = True):
        super().__init__()
        self.y_range = tuple(float(v) for v in y_range)
        self.u_emb = embedding(n_users, emb_sz_rule(n_users))
        self.i_emb = embedding(n_items, emb_sz_rule(n_items))
        self.emb_drop = nn.Dropout(emb_drop)
        n_in, blocks = self.u_emb.embedding_dim + self.i_emb.embedding_dim, []
        for width, p in zip(layers, ps):
            # fastai's LinBnDrop with lin_first: Linear -> ReLU -> BatchNorm -> Dropout
            blocks += [nn.Linear(n_in, width, bias=not use_bn), nn.ReLU()]
            blocks += [nn.BatchNorm1d(width)] if use_bn else []
            blocks += [nn.Dropout(p)] if p else []
            n_in = width
        blocks.append(nn.Linear(n_in, 1))
        self.layers = nn.Sequential(*blocks)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        x = self.emb_drop(torch.cat([self.u_emb(user), self.i_emb(item)], 1))
        return sigmoid_range(self.layers(x).squeeze(1), *self.y_range)

    def item_factors(self) -> torch.Tensor:
        return self.i_emb.weight


def splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """One param group: collab models have no pretrained body to treat differently."""
    return [list(model.parameters())]
