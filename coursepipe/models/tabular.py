"""fastai's TabularModel: entity embeddings + batch-normed continuous inputs -> MLP."""
from __future__ import annotations

import torch
from torch import nn


def emb_sz_rule(n_cat: int) -> int:
    """fastai's embedding width for a column with n_cat levels."""
    return min(600, round(1.6 * n_cat ** 0.56))


class TabularModel(nn.Module):
    def __init__(self, cardinalities: list[int], n_cont: int, n_out: int,
                 layers=(200, 100), ps=(0.0, 0.0), emb_drop: float = 0.0, use_bn: bool = True):
        super().__init__()
        self.embeds = nn.ModuleList(nn.Embedding(n, emb_sz_rule(n)) for n in cardinalities)
        self.emb_drop = nn.Dropout(emb_drop)
        self.bn_cont = nn.BatchNorm1d(n_cont) if n_cont else None
        n_in = sum(e.embedding_dim for e in self.embeds) + n_cont
        blocks = []
        for width, p in zip(layers, ps):
            # fastai's LinBnDrop with lin_first: Linear -> ReLU -> BatchNorm -> Dropout
            blocks += [nn.Linear(n_in, width, bias=not use_bn), nn.ReLU(inplace=True)]
            blocks += [nn.BatchNorm1d(width)] if use_bn else []
            blocks += [nn.Dropout(p)] if p else []
            n_in = width
        blocks.append(nn.Linear(n_in, n_out))
        self.layers = nn.Sequential(*blocks)

    def forward(self, x_cat: torch.Tensor, x_cont: torch.Tensor) -> torch.Tensor:
        # x_cat (B, n_cat) int64, x_cont (B, n_cont) float32 -> logits (B, n_out)
        parts = [e(x_cat[:, i]) for i, e in enumerate(self.embeds)]
        x = self.emb_drop(torch.cat(parts, 1)) if parts else x_cont.new_zeros((len(x_cont), 0))
        if self.bn_cont is not None:
            x = torch.cat([x, self.bn_cont(x_cont)], 1)
        return self.layers(x)


def splitter(model: TabularModel) -> list[list[nn.Parameter]]:
    """Param groups for discriminative learning rates: embeddings, then the body and head."""
    emb = list(model.embeds.parameters())
    ids = {id(p) for p in emb}
    return [emb, [p for p in model.parameters() if id(p) not in ids]]
