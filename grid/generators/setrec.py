"""SETRec: each item is a set of order-agnostic tokens (one CF, N semantic), generated at once."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grid.config import check_divides, check_fields
from grid.data import last_items
from grid.errors import GridError
from grid.generators.base import (
    PipelineInputs,
    Recommender,
    bf16_matmuls,
    top_k_scored,
)
from grid.generators.layers import Block as LayoutBlock
from grid.generators.layers import Layout
from grid.generators.sasrec import Block, SASRec
from grid.metrics import KS, RankingTotals

BETAS = tuple(i / 10 for i in range(11))  # the validation grid when `beta` is null
PARAM_RANGES = {
    "semantic_tokens": "[1, inf)",
    "hidden": "[1, inf)",
    "blocks": "[1, inf)",
    "heads": "[1, inf)",
    "dropout": "[0, 1)",
    "ae_hidden": "[1, inf)",
    "alpha": "[0, inf)",
    "beta": "[0, 1]",  # null: chosen on validation
    "max_history": "[1, inf)",
    "lr": "(0, inf)",
    "weight_decay": "[0, inf)",
    "warmup_steps": "[0, inf)",
}
SCHEDULES = ("constant", "cosine")
ARCHITECTURES = ("decoder_only", "encoder_decoder")
SELECT_BY = "ndcg@10"  # picks beta on validation (the default monitor); ties: the smaller beta


def set_attention_mask(items: int, tokens_per_item: int, queries: int) -> torch.Tensor:
    """SETRec's sparse mask `[S, S]` (True: may attend), S = items x tokens_per_item + queries.

    A history token sees itself and every token of earlier items, never the other tokens of its
    own item; a query sees every history token and itself, never the other queries.
    """
    S = items * tokens_per_item + queries
    group = (torch.arange(S) // tokens_per_item).clamp(max=items)  # the queries form group `items`
    return (group[:, None] > group[None, :]) | torch.eye(S, dtype=torch.bool)


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


class SETRec(Recommender):
    """Set identifiers for generative recommendation (Lin et al., SIGIR 2025), as configured here.

    Item i is the set {CF token, semantic tokens 1..N}: the CF token is a linear map of a CF item
    embedding, the semantic tokens split the latent of an autoencoder over i's text embedding.
    A transformer reads the history's tokens under `set_attention_mask`; N+1 learnable queries
    each emit the token of one dimension, scored against that dimension's token of every item.
    Inference score: (1 - beta) x CF score + beta x sum of the N semantic scores.
    """

    consumes = frozenset({"embeddings", "cf_embeddings"})

    @classmethod
    def check_params(cls, **params) -> None:
        choices = {"schedule": SCHEDULES, "architecture": ARCHITECTURES}
        check_fields("generator", params, PARAM_RANGES, choices)
        check_divides("generator", params, "hidden", "heads")

    @classmethod
    def build(cls, inputs: PipelineInputs, cf_encoder=None, **params) -> SETRec:
        # cf_encoder names the stage that produced inputs.cf_embeddings (see the runner)
        if inputs.cf_embeddings is None:
            raise GridError(
                "generator=setrec needs collaborative item embeddings: set generator.cf_encoder "
                "to a CF encoder config (e.g. cf:sasrec)"
            )
        if inputs.item_embeddings is None:
            raise GridError("generator=setrec needs text item embeddings: configure an encoder")
        return cls(inputs.item_embeddings, inputs.cf_embeddings, **params)

    def __init__(
        self,
        text_embeddings: np.ndarray,
        cf_embeddings: np.ndarray,
        semantic_tokens: int = 4,
        hidden: int = 64,
        blocks: int = 2,
        heads: int = 1,
        architecture: str = "decoder_only",
        dropout: float = 0.1,
        ae_hidden: tuple[int, ...] = (512, 256, 128),
        alpha: float = 0.7,
        beta: float | None = None,
        whiten: bool = False,
        max_history: int = 20,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        schedule: str = "constant",
        warmup_steps: int = 0,
        bf16: bool = True,
        ks: tuple[int, ...] = KS,
        packed: bool = True,
    ):
        self.check_params(
            semantic_tokens=semantic_tokens,
            hidden=hidden,
            blocks=blocks,
            architecture=architecture,
            heads=heads,
            dropout=dropout,
            ae_hidden=list(ae_hidden),
            alpha=alpha,
            beta=beta,
            max_history=max_history,
            lr=lr,
            weight_decay=weight_decay,
            schedule=schedule,
            warmup_steps=warmup_steps,
        )
        super().__init__(len(text_embeddings), ks, packed)
        if len(cf_embeddings) != len(text_embeddings):
            raise GridError(
                f"setrec: {len(cf_embeddings)} CF embeddings for {len(text_embeddings)} items; "
                f"embed both with the same dataset"
            )
        self.save_hyperparameters(ignore=["text_embeddings", "cf_embeddings"])
        self.alpha, self.beta, self.max_history = alpha, beta, max_history
        self.lr, self.weight_decay, self.bf16 = lr, weight_decay, bf16
        self.schedule, self.warmup_steps = schedule, warmup_steps
        self.dims = semantic_tokens + 1  # tokens per item: CF first, then the semantic ones

        text = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if whiten:  # per-dimension standardisation: the reconstruction loss is O(1) per encoder
            std = text.std(0)
            text = (text - text.mean(0)) / std.clamp(min=1e-6 * float(std.max()))  # constant: 0
        # inputs from the cached stages, not learned: kept out of checkpoints
        self.register_buffer("text", text, persistent=False)
        cf = torch.as_tensor(cf_embeddings, dtype=torch.float32)
        self.register_buffer("cf", cf, persistent=False)

        self.cf_proj = nn.Linear(cf.shape[1], hidden)
        sizes = [text.shape[1], *ae_hidden, semantic_tokens * hidden]
        self.encoder, self.decoder = mlp(sizes), mlp(sizes[::-1])
        self.pos_emb = nn.Embedding(max_history, hidden)
        self.queries = nn.Parameter(0.02 * torch.randn(self.dims, hidden))
        self.drop = nn.Dropout(dropout)
        self.architecture = architecture
        if architecture == "decoder_only":
            self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(blocks))
            self.blocks.apply(SASRec._init)
        else:  # the paper's T5 form: a bidirectional history encoder, queries in the decoder
            make = lambda cross: LayoutBlock(  # noqa: E731
                hidden, heads, hidden // heads, 4 * hidden, dropout, cross, packed=packed
            )
            self.history_blocks = nn.ModuleList(make(False) for _ in range(blocks))
            self.query_blocks = nn.ModuleList(make(True) for _ in range(blocks))
            self.history_norm = nn.LayerNorm(hidden)
            for module in (*self.history_blocks.modules(), *self.query_blocks.modules()):
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        self.ln_f = nn.LayerNorm(hidden)
        nn.init.normal_(self.pos_emb.weight, std=0.02)  # small beside the tokens, as in SASRec
        self._cache: torch.Tensor | None = None  # `item_tokens()` during an evaluation
        self._beta_totals: list[RankingTotals] = []
        self._beta_lists: list[list] = []

    def _autocast(self):
        """bf16 matmuls where enabled: on CPUs with bf16 dot products they run several x faster."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # --- item tokens ---------------------------------------------------------------------------

    def item_tokens(self, latent: torch.Tensor | None = None) -> torch.Tensor:
        """Every item's token set `[num_items, N + 1, hidden]`, the CF token first."""
        latent = self.encoder(self.text) if latent is None else latent
        cf = self.cf_proj(self.cf)
        return torch.cat([cf[:, None], latent.view(len(cf), self.dims - 1, -1)], dim=1)

    # --- history encoding and query-guided generation -----------------------------------------

    def generate(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Query outputs `[B, N + 1, hidden]` for history token sets `[B, T, N + 1, hidden]`
        (right-padded; `length` real items per row): output j predicts the next item's token j."""
        B, T, n, d = tokens.shape
        ar = torch.arange(T, device=tokens.device)
        # the tokens of one item share its position, counted back from the most recent item
        pos = (length[:, None] - 1 - ar).clamp(min=0)
        x = (tokens + self.pos_emb(pos)[:, :, None]).flatten(1, 2)
        if self.architecture == "encoder_decoder":
            return self._encode_decode(self.drop(x), (ar < length[:, None]).repeat_interleave(n, 1))
        x = self.drop(torch.cat([x, self.queries.expand(B, n, d)], dim=1))
        real = torch.cat(
            [(ar < length[:, None]).repeat_interleave(n, dim=1), x.new_ones(B, n, dtype=bool)], 1
        )
        structure = set_attention_mask(T, n, n).to(x.device)
        eye = torch.eye(len(structure), dtype=torch.bool, device=x.device)
        # padded keys are hidden; padded positions still see themselves (no empty softmax row)
        mask = structure & (real[:, None, :] | eye)
        with self._autocast():
            for i, block in enumerate(self.blocks):
                # only the queries' outputs are read: the last block computes those alone
                x = block(x, mask[:, None], last=n if i == len(self.blocks) - 1 else None)
        return self.ln_f(x[:, -n:])

    def _encode_decode(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The T5 form: the history tokens `x [B, S, d]` (`real [B, S]`) under a padding mask
        only, then the N + 1 queries, causal among themselves (a T5 decoder's inputs), attending
        to the encoded history. Returns the query outputs `[B, N + 1, d]`."""
        B, n = len(x), self.dims
        history = Layout.of(real, packed=self.packed)
        queries = Layout.of(real.new_ones(B, n), causal=True, packed=self.packed)
        h = history.pack(x)
        q = queries.pack(self.drop(self.queries.expand(B, n, -1)))
        with self._autocast():
            for block in self.history_blocks:
                h = block(h, history)[0]
            memory = self.history_norm(h)
            for block in self.query_blocks:
                kv = block.cross.memory_kv(memory, history)
                q = block(q, queries, memory_kv=kv, memory_mask=real[:, None, None, :])[0]
        return self.ln_f(queries.pad(q))

    def query_outputs(self, batch: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """Query outputs `[B, N + 1, hidden]` for a batch's histories, given all item tokens."""
        length = batch["length"].clamp(min=1)
        history, length = last_items(batch["history"], length, self.max_history)
        # index_select: its backward adds the gradients of repeated items in a fixed order
        items = tokens.index_select(0, history.clamp(min=0).flatten()).view(
            *history.shape, *tokens.shape[1:]
        )
        return self.generate(items, length)

    # --- training ------------------------------------------------------------------------------

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over all items, averaged over the N + 1 dimensions, and the
        autoencoder's reconstruction error on the batch's history items."""
        with self._autocast():  # every item's tokens: each dimension's softmax is over all items
            latent = self.encoder(self.text)
            tokens = self.item_tokens(latent)
        out = self.query_outputs(batch, tokens.float())  # a float32 residual stream
        with self._autocast():
            logits = torch.bmm(out.transpose(0, 1), tokens.permute(1, 2, 0))  # [N + 1, B, I]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["target"].repeat(self.dims))
        if self.packed:
            seen = batch["history"].unique()
            seen = seen[seen >= 0]
            recon = F.mse_loss(self.decoder(latent[seen].float()), self.text[seen])
        else:  # the same mean through a mask over all items: no data-dependent shape
            history = batch["history"].flatten()
            seen = latent.new_zeros(self.num_items + 1, dtype=torch.float32)
            seen = seen.index_fill(0, torch.where(history < 0, self.num_items, history), 1.0)
            seen = seen[:-1]
            error = (self.decoder(latent.float()) - self.text).pow(2).mean(1)
            recon = (error * seen).sum() / seen.sum()
        return ce, recon

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce, recon = self.loss(batch)
        loss = ce + self.alpha * recon
        self.log_loss("train/loss", loss, batch, prog_bar=True)
        self.log_loss("train/ce", ce, batch)
        self.log_loss("train/recon", recon, batch)
        return loss

    def configure_optimizers(self):
        opt = self.optimizer(torch.optim.Adam, lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "constant":
            return opt
        return self.with_schedule(opt, self.warmup_steps)

    # --- inference -----------------------------------------------------------------------------

    def _tokens(self) -> torch.Tensor:
        """Every item's tokens `[num_items, N + 1, hidden]`, cached for an evaluation."""
        return self.item_tokens() if self._cache is None else self._cache

    @torch.no_grad()
    def dimension_scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """CF scores and summed semantic scores `[B, num_items]` of every item."""
        tokens = self._tokens()
        out, table, d = self.query_outputs(batch, tokens), tokens.flatten(1), tokens.shape[2]
        with bf16_matmuls(self.bf16):
            return out[:, 0] @ table[:, :d].T, out[:, 1:].flatten(1) @ table[:, d:].T

    @torch.no_grad()
    def scores(self, batch: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
        """(1 - beta) x CF score + beta x summed semantic scores `[B, num_items]`: one matmul."""
        tokens = self._tokens()
        out = self.query_outputs(batch, tokens)
        weight = out.new_full((self.dims, 1), beta)
        weight[0] = 1.0 - beta
        with bf16_matmuls(self.bf16):  # float32 scores: bf16 ones would tie near-equal items
            return (out * weight).flatten(1) @ tokens.flatten(1).T

    @torch.no_grad()
    def recommend_scored(
        self, batch: dict[str, torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k items of best mixed score (1 - beta) x CF + beta x semantic."""
        if self.beta is None:
            raise GridError(
                "setrec: beta is chosen on validation data: validate before testing, or set "
                "generator.beta"
            )
        return top_k_scored(self.scores(batch, self.beta), k)

    def catalogue_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scores(batch, self.beta)

    # --- evaluation: beta chosen on validation -------------------------------------------------

    def _selecting(self) -> bool:
        return self.hparams.beta is None

    def chooses_on_validation(self) -> bool:
        return self._selecting()

    def _eval_start(self) -> None:
        super()._eval_start()
        self._cache = None
        with torch.no_grad():
            self._cache = self.item_tokens()
        self._beta_totals = [
            RankingTotals(self.num_items, self.ks, self.device, categories=self.item_categories)
            for _ in BETAS
        ]
        self._beta_lists = [[] for _ in BETAS]  # each beta's recorded lists, when recording

    def validation_step(self, batch, batch_idx) -> None:
        if not self._selecting():
            return super().validation_step(batch, batch_idx)
        cf, semantic = self.dimension_scores(batch)
        for totals, lists, beta in zip(self._beta_totals, self._beta_lists, BETAS, strict=True):
            ranked, scores = top_k_scored(torch.lerp(cf, semantic, beta), max(self.ks))
            totals.update(ranked, batch["target"], batch.get("warm"))
            if self.recorded is not None:
                lists.append((batch["user"].cpu(), ranked.cpu(), scores.cpu()))
        self._users += len(batch["target"])

    def on_validation_epoch_end(self) -> None:
        if self._selecting():
            reduce = self.trainer.strategy.reduce
            chosen = torch.stack([torch.as_tensor(t.sums[SELECT_BY]) for t in self._beta_totals])
            best = int(reduce(chosen.to(self.device), reduce_op="sum").argmax())
            self._totals, self.beta = self._beta_totals[best], BETAS[best]
            if self.recorded is not None:
                self.recorded = self._beta_lists[best]
        self.log("setrec/beta", self.beta)
        super().on_validation_epoch_end()
        self._cache = None

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._cache = None
