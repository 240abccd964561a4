"""SimGR: rank every item by the similarity of its SID-token embedding to the user's history state.

Zhao et al., "SimGR: Escaping the Pitfalls of Generative Decoding in LLM-based Recommendation":
instead of generating the next item's SID token by token, model p(item | history) directly as a
softmax over all items of <user, item> / tau, where both sides are built from SID tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from grid.config import check_fields
from grid.data import last_items
from grid.errors import GridError
from grid.generators.base import (
    PipelineInputs,
    Recommender,
    bf16_matmuls,
    pad_ranked,
    running_top_k,
)
from grid.generators.layers import Block, Layout, last_states
from grid.sids import SemanticIDs

AGGREGATIONS = ("mean", "concat", "gate", "attention")
SEARCHES = ("matmul", "faiss")
SCHEDULES = ("constant", "cosine")
PARAM_CHOICES = {"aggregation": AGGREGATIONS, "search": SEARCHES, "schedule": SCHEDULES}
PARAM_RANGES = {
    "d_model": "[1, inf)",
    "num_heads": "[1, inf)",
    "head_dim": "[1, inf)",
    "d_ff": "[1, inf)",
    "layers": "[1, inf)",
    "dropout": "[0, 1)",
    "max_history": "[1, inf)",
    "tau": "(0, inf)",
    "lr": "(0, inf)",
    "weight_decay": "[0, inf)",
    "warmup_ratio": "[0, 1]",
}
SCORE_CHUNK = 65536  # items scored per matmul: bounds the `[B, chunk]` score block


def top_k_inner_product(
    queries: torch.Tensor, items: torch.Tensor, k: int, chunk: int = SCORE_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner products and ids `[B, min(k, N)]` of the items `[N, d]` with the largest inner
    product, best first, scoring a chunk of items at a time."""
    starts = range(0, len(items), chunk)
    return running_top_k(((s, queries @ items[s : s + chunk].T) for s in starts), k)


class TokenAggregation(nn.Module):
    """An item's embedding `[..., d]` from the embeddings `[..., L, d]` of its L SID tokens.

    mean: their average; concat: a linear projection of their concatenation; gate: the average
    of the tokens weighted element-wise by sigmoid gates computed from each token; attention:
    their average weighted by a softmax of each token's match with a learned query.
    """

    def __init__(self, kind: str, length: int, dim: int):
        super().__init__()
        if kind not in AGGREGATIONS:
            raise GridError(f"simgr: aggregation {kind!r} is not one of {AGGREGATIONS}")
        self.kind = kind
        if kind == "concat":
            self.proj = nn.Linear(length * dim, dim, bias=False)
        elif kind == "gate":
            self.gate = nn.Linear(dim, dim)
        elif kind == "attention":
            self.query = nn.Parameter(torch.zeros(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return tokens.mean(-2)
        if self.kind == "concat":
            return self.proj(tokens.flatten(-2))
        if self.kind == "gate":
            return (torch.sigmoid(self.gate(tokens)) * tokens).mean(-2)
        weights = (tokens @ self.query * tokens.shape[-1] ** -0.5).softmax(-1)
        return (weights[..., None] * tokens).sum(-2)


class SimGR(Recommender):
    """A causal transformer over the history's SID tokens; items scored by inner product.

    Each SID position has its own vocabulary slice (as in TIGER); the token embeddings are shared
    by the history encoder and the item embeddings, so items unseen in training still get one.
    """

    @classmethod
    def check_params(cls, **params) -> None:
        check_fields("generator", params, PARAM_RANGES, PARAM_CHOICES)

    @classmethod
    def build(cls, inputs: PipelineInputs, **params) -> SimGR:
        if inputs.sids is None:
            raise GridError(
                "generator=simgr needs semantic IDs: configure a tokenizer stage (e.g. rkmeans)"
            )
        return cls(inputs.sids, **params)

    def __init__(
        self,
        sids: SemanticIDs,
        d_model: int = 64,
        num_heads: int = 2,
        head_dim: int = 32,
        d_ff: int = 256,
        layers: int = 2,
        dropout: float = 0.1,
        max_history: int = 20,
        aggregation: str = "mean",
        tau: float = 0.1,
        search: str = "matmul",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "constant",
        warmup_ratio: float = 0.0,
        bf16: bool = True,
        **kwargs,
    ):
        self.check_params(
            d_model=d_model,
            num_heads=num_heads,
            head_dim=head_dim,
            d_ff=d_ff,
            layers=layers,
            dropout=dropout,
            max_history=max_history,
            aggregation=aggregation,
            tau=tau,
            search=search,
            lr=lr,
            weight_decay=weight_decay,
            schedule=schedule,
            warmup_ratio=warmup_ratio,
        )
        super().__init__(sids.num_items, **kwargs)
        self.save_hyperparameters(ignore=["sids"])
        self.sids, self.max_history, self.tau, self.search = sids, max_history, tau, search
        self.lr, self.weight_decay, self.bf16 = lr, weight_decay, bf16
        self.schedule, self.warmup_ratio = schedule, warmup_ratio
        L = self.levels = sids.length
        offsets = torch.tensor([0, *sids.vocab_sizes]).cumsum(0)
        self.pad = int(offsets[-1])
        item_tokens = torch.as_tensor(sids.codes) + offsets[:-1]
        item_tokens = torch.cat([item_tokens, torch.full((1, L), self.pad)])  # row -1: padding
        self.register_buffer("item_tokens", item_tokens, persistent=False)

        self.embed = nn.Embedding(self.pad + 1, d_model)
        self.pos = nn.Embedding(max_history * L, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, num_heads, head_dim, d_ff, dropout, cross=False, packed=self.packed)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model, bias=False)
        self.aggregate = TokenAggregation(aggregation, L, d_model)
        self.apply(self._init)
        self._table: torch.Tensor | None = None  # item embeddings cached during evaluation
        self._index = None  # the faiss index over them (search=faiss)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def item_embeddings(self) -> torch.Tensor:
        """Every item's embedding `[num_items, d]`, aggregated from its SID tokens."""
        tokens = self.item_tokens[:-1]
        if self.aggregate.kind == "mean":  # without the `[N, L, d]` intermediate
            return F.embedding_bag(tokens, self.embed.weight, mode="mean")
        return self.aggregate(self.embed(tokens))

    def user_embeddings(self, history: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Final hidden state `[B, d]` after the SID tokens of right-padded item histories."""
        history, length = last_items(history, length.clamp(min=1), self.max_history)
        rows = torch.where(history < 0, self.num_items, history)
        tokens = self.item_tokens[rows].flatten(1)  # [B, T*L], right-padded
        B, S = tokens.shape
        count = length * self.levels
        ar = torch.arange(S, device=tokens.device)
        # Right padding under a causal mask: no real token sees a pad, so no key mask is needed.
        layout = Layout.of(ar < count[:, None], causal=True, packed=self.packed)
        # Positions count back from the most recent token, as in SASRec.
        pos = (count[:, None] - 1 - ar).clamp(min=0)
        x = self.drop(self.embed(layout.pack(tokens)[:, 0]) + self.pos(layout.pack(pos)[:, 0]))
        with self._autocast():
            # only each row's last token is read
            x = last_states(self.blocks, x, layout, layout.last_rows(count))
        return self.norm(x)

    def _autocast(self):
        """bf16 transformer matmuls where enabled: several x faster on CPUs with bf16 units."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def inner_products(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """`user @ items.T` `[B, n]` in float32 (from bf16-rounded inputs where enabled)."""
        with bf16_matmuls(self.bf16):
            return user @ items.T

    def scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits `[B, num_items]`: <user, item> / tau for every item."""
        user = self.user_embeddings(batch["history"], batch["length"])
        return self.inner_products(user, self.item_embeddings()) / self.tau

    def configure_optimizers(self):
        opt = self.optimizer(lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return opt
        return self.with_schedule(opt, warmup_ratio=self.warmup_ratio)

    # --- inference -----------------------------------------------------------------------------

    def _eval_start(self) -> None:
        super()._eval_start()
        with torch.no_grad():
            self._table = self.item_embeddings().contiguous()
        self._index = None
        if self.search == "faiss":
            import faiss

            self._index = faiss.IndexFlatIP(self._table.shape[1])
            self._index.add(self._table.float().cpu().numpy())

    def _eval_end(self, stage: str) -> None:
        super()._eval_end(stage)
        self._table = self._index = None

    def catalogue_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        user = self.user_embeddings(batch["history"], batch["length"])
        table = self.item_embeddings() if self._table is None else self._table
        return self.inner_products(user, table)

    @torch.no_grad()
    def recommend_scored(
        self, batch: dict[str, torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k items of largest <user, item> / tau (the training logits)."""
        user = self.user_embeddings(batch["history"], batch["length"])
        if self._index is not None:
            values, top = self._index.search(user.float().cpu().numpy(), min(k, self.num_items))
            values, top = (torch.as_tensor(a, device=user.device) for a in (values, top))
        else:
            table = self.item_embeddings() if self._table is None else self._table
            with bf16_matmuls(self.bf16):
                values, top = top_k_inner_product(user, table, k)
        return pad_ranked(top, values / self.tau, k)
