"""SASRec: causal self-attention over item ids, trained with full-softmax cross-entropy."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from grid.config import check_divides, check_fields
from grid.data import last_items
from grid.generators.base import Recommender, top_k_scored
from grid.metrics import KS


class Block(nn.Module):
    """Pre-LN block: causal self-attention (or attention under a bool `mask`, True: may attend),
    then a point-wise feed-forward layer as wide as its input (as in the original SASRec)."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, last: int | None = None
    ) -> torch.Tensor:
        """With `last` (and a `mask`), only the last `last` positions are computed and returned;
        every position still serves as a key."""
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        if last is not None:
            q, x, mask = q[:, -last:], x[:, -last:], mask[..., -last:, :]
        Tq = q.shape[1]
        q = q.view(B, Tq, self.heads, C // self.heads).transpose(1, 2)
        k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None
        )
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, Tq, C)))
        return x + self.drop(self.mlp(self.ln2(x)))


PARAM_RANGES = {
    "hidden": "[1, inf)",
    "blocks": "[1, inf)",
    "heads": "[1, inf)",
    "dropout": "[0, 1)",
    "max_history": "[1, inf)",
    "lr": "(0, inf)",
    "weight_decay": "[0, inf)",
}


class SASRec(Recommender):
    """Self-attentive sequential recommender; scores all items as user state · item embedding."""

    consumes = frozenset()

    @classmethod
    def check_params(cls, **params) -> None:
        check_fields("generator", params, PARAM_RANGES)
        check_divides("generator", params, "hidden", "heads")

    def __init__(
        self,
        num_items: int,
        hidden: int = 64,
        blocks: int = 2,
        heads: int = 1,
        dropout: float = 0.3,
        max_history: int = 20,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        ks: tuple[int, ...] = KS,
        packed: bool = True,
    ):
        self.check_params(
            hidden=hidden,
            blocks=blocks,
            heads=heads,
            dropout=dropout,
            max_history=max_history,
            lr=lr,
            weight_decay=weight_decay,
        )
        super().__init__(num_items, ks, packed)
        self.save_hyperparameters()
        self.max_history, self.lr, self.weight_decay = max_history, lr, weight_decay
        self.item_emb = nn.Embedding(num_items + 1, hidden, padding_idx=num_items)  # last row: pad
        self.pos_emb = nn.Embedding(max_history, hidden)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(hidden)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()

    def item_embeddings(self) -> torch.Tensor:
        """The item embedding table `[num_items, hidden]` (shared by input and output)."""
        return self.item_emb.weight[: self.num_items]

    def user_state(self, history: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Hidden state `[B, hidden]` at the last real position of right-padded histories."""
        history, length = last_items(history, length.clamp(min=1), self.max_history)
        T = history.shape[1]
        # Positions count back from the most recent item, so it always gets position 0 whatever
        # the history length (what left-padding gives the original SASRec).
        pos = (length[:, None] - 1 - torch.arange(T, device=history.device)).clamp(min=0)
        tokens = torch.where(history < 0, self.num_items, history)
        x = self.drop(self.item_emb(tokens) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        # Causal attention: the last real position never sees the right padding.
        last = x[torch.arange(len(x), device=x.device), length - 1]
        return self.ln_f(last)

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores `[B, num_items]` of every item for each history."""
        return self.user_state(batch["history"], batch["length"]) @ self.item_embeddings().T

    def recommend_scored(
        self, batch: dict[str, torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k items of largest inner product with the user state."""
        return top_k_scored(self.scores(batch), k)

    def catalogue_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores(batch)

    def configure_optimizers(self):
        return self.optimizer(torch.optim.Adam, lr=self.lr, weight_decay=self.weight_decay)
