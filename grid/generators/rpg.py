"""RPG: all codes of a long, unordered semantic ID predicted in parallel (Hou et al., KDD 2025)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial

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
    pad_ranked,
    running_top_k,
)
from grid.generators.layers import ACTIVATIONS, Block, Layout, last_states
from grid.sids import SemanticIDs

log = logging.getLogger(__name__)

DECODINGS = ("exact", "graph")
PARAM_RANGES = {
    "hidden": "[1, inf)",
    "layers": "[1, inf)",
    "heads": "[1, inf)",
    "d_ff": "[1, inf)",
    "dropout": "[0, 1)",
    "embed_dropout": "[0, 1)",
    "attn_dropout": "[0, 1)",
    "norm_eps": "(0, inf)",
    "tau": "(0, inf)",
    "max_history": "[1, inf)",
    "lr": "(0, inf)",
    "weight_decay": "[0, inf)",
    "warmup_steps": "[0, inf)",
    "schedule_epochs": "(0, inf)",
    "beam_width": "[1, inf)",
    "n_edges": "[1, inf)",
    "steps": "[1, inf)",
}
SCORE_CHUNK_BYTES = 2**26  # item scores held at once by exact decoding
SCORE_USERS = 64  # users scored together by exact decoding: their code table fits a core's L2
ITEM_INPUTS_CACHE_BYTES = 2**28  # evaluation caches every item's input embedding up to this size
GRAPH_CHUNK_BYTES = 2**28  # similarities held at once while building the item graph
GRAPH_BLOCK_ITEMS = 512  # graph rows built at once: keeps the lookup table in cache
# Graph decoding scores every item in exact decoding's vectorised pass and walks over those scores
# while the catalogue has at most this many items per candidate a walk scores; beyond, it looks up
# each candidate's m codes (the two break even near 100k items at the paper's beam 10, 100 edges
# and 3 steps on CPU: bench/bench_rpg_decoding.py)
GRAPH_LOOKUP_COST = 32


def sum_rows(index: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`out[i] = sum_p table[index[i, p]]`: `[n, m]` rows of `[R, c]` -> `[n, c]`.

    One embedding_bag pass (no `[n, m, c]` intermediate); it adds the m rows in order, so
    every caller gets bit-identical sums.
    """
    return F.embedding_bag(index, table, mode="sum")


def graph_block(num_items: int, chunk_bytes: int = GRAPH_CHUNK_BYTES) -> int:
    """Items whose graph rows are built together: `[num_items, block]` floats fit `chunk_bytes`."""
    return max(1, min(num_items, GRAPH_BLOCK_ITEMS, chunk_bytes // (4 * num_items)))


def distinct_sorted(cand: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's distinct items of `cand [B, C]`, ascending and packed left, and the mask of
    the slots after them (holding item 0)."""
    cand, _ = cand.sort(dim=1)
    first = torch.ones_like(cand, dtype=torch.bool)
    first[:, 1:] = cand[:, 1:] != cand[:, :-1]
    slot = first.cumsum(1) - 1  # each candidate's rank among its row's distinct items
    width = int(slot[:, -1].max()) + 1
    items = cand.new_zeros(len(cand), width).scatter_(1, slot, cand)
    return items, torch.arange(width, device=cand.device) > slot[:, -1:]


def distinct_stamped(cand: torch.Tensor, stamp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`cand [B, C]` and the mask of each item's repeats within its row, found through the
    scratch `stamp [B, num_items]` (int32): cheaper than sorting while the scratch is in cache."""
    B, C = cand.shape
    slot = torch.arange(C, dtype=stamp.dtype, device=cand.device).expand(B, C)
    stamp.scatter_(1, cand, slot)  # an item listed twice keeps one slot: the one written last
    return cand, stamp.gather(1, cand) != slot


def best_items(
    items: torch.Tensor, masked: torch.Tensor, score: Callable, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best `items [B, C]` by `score(items)` `[B, C]` and their scores, best first,
    leaving out the `masked` ones; -1 (score -inf) where a row has fewer."""
    scores = score(items).masked_fill_(masked, float("-inf"))
    top = scores.topk(min(n, items.shape[1]), dim=1)
    best = items.gather(1, top.indices).masked_fill_(top.values == float("-inf"), -1)
    return pad_ranked(best, top.values, n)


@torch.no_grad()
def item_graph(
    codebooks: torch.Tensor,
    item_index: torch.Tensor,
    n_edges: int,
    chunk_bytes: int = GRAPH_CHUNK_BYTES,
) -> torch.Tensor:
    """Each item's `n_edges` most similar items (itself included), as int32 `[N, n_edges]`.

    Similarity of two items = mean over code positions of the cosine between their codes'
    embeddings (`codebooks [m, V, d]`; `item_index [N, m]` holds flat rows `p * V + code`).
    Built for a block of items at a time, so memory stays O(N x block), never N x N.
    """
    m, V, _ = codebooks.shape
    unit = F.normalize(codebooks.float(), dim=-1)
    cosine = unit @ unit.transpose(1, 2)  # [m, V, V]: code-code cosine per position
    N = len(item_index)
    offsets = torch.arange(m, device=item_index.device) * V
    block = graph_block(N, chunk_bytes)
    graph = torch.empty(N, n_edges, dtype=torch.int32, device=item_index.device)
    for start in range(0, N, block):
        codes = (item_index[start : start + block] - offsets).T  # [m, b] codes of the block
        # table[p * V + v, i] = cos(code v, code of item i) at position p
        table = cosine.gather(2, codes[:, None, :].expand(m, V, -1)).reshape(m * V, -1)
        sims = sum_rows(item_index, table)  # [N, b]; m x the mean similarity
        graph[start : start + block] = sims.topk(n_edges, dim=0).indices.T.int()
    return graph


class RPG(Recommender):
    """Multi-token prediction over OPQ-style codes with a small causal transformer.

    An item enters as the mean of its m code embeddings; the state after the history goes
    through one residual projection per code position, and a code's logit is the cosine with
    that position's code embedding over `tau` (embeddings shared by input and output). An item
    scores the mean log-probability of its codes: `decoding: exact` scores the whole catalogue,
    `graph` refines a beam over an item similarity graph (the paper's graph-constrained
    decoding). Model selection (validation) always scores exactly.
    """

    @classmethod
    def check_params(cls, **params) -> None:
        choices = {"decoding": DECODINGS, "activation": tuple(ACTIVATIONS)}
        check_fields("generator", params, PARAM_RANGES, choices)
        check_divides("generator", params, "hidden", "heads")

    @classmethod
    def build(cls, inputs: PipelineInputs, **params) -> RPG:
        if inputs.sids is None:
            raise GridError(
                "generator=rpg needs semantic IDs: configure a tokenizer stage (e.g. tokenizer=opq)"
            )
        if inputs.sids.num_items != inputs.num_items:
            raise GridError(
                f"the semantic IDs cover {inputs.sids.num_items} items but the catalogue has "
                f"{inputs.num_items}; re-run the tokenizer stage on this dataset"
            )
        if inputs.sids.ordered:
            log.warning(
                "generator=rpg was designed for long unordered OPQ codes (tokenizer=opq, 16-64 "
                "subspaces); these SIDs are %d ordered codes, a setting it was not tuned for",
                inputs.sids.length,
            )
        return cls(inputs.sids, **params)

    def __init__(
        self,
        sids: SemanticIDs,
        hidden: int = 448,
        layers: int = 2,
        heads: int = 4,
        d_ff: int = 1024,
        dropout: float = 0.1,
        embed_dropout: float | None = None,
        attn_dropout: float = 0.0,
        activation: str = "relu",
        bias: bool = False,
        norm_eps: float = 1e-5,
        tau: float = 0.03,
        max_history: int = 20,
        lr: float = 0.01,
        weight_decay: float = 0.1,
        warmup_steps: int = 0,
        schedule_epochs: float | None = None,
        decoding: str = "exact",
        beam_width: int = 10,
        n_edges: int = 100,
        steps: int = 3,
        bf16: bool = True,
        seed: int = 0,
        **kwargs,
    ):
        self.check_params(
            hidden=hidden,
            layers=layers,
            heads=heads,
            d_ff=d_ff,
            dropout=dropout,
            embed_dropout=embed_dropout,
            attn_dropout=attn_dropout,
            activation=activation,
            norm_eps=norm_eps,
            tau=tau,
            max_history=max_history,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            schedule_epochs=schedule_epochs,
            decoding=decoding,
            beam_width=beam_width,
            n_edges=n_edges,
            steps=steps,
        )
        super().__init__(sids.num_items, **kwargs)
        N = sids.num_items
        for name, value in (("n_edges", n_edges), ("beam_width", beam_width)):
            if decoding == "graph" and value > N:
                raise GridError(
                    f"generator.{name}={value} is larger than the catalogue ({N} items); "
                    f"set it to at most {N}"
                )
        self.save_hyperparameters(ignore=["sids"])
        self.sids, self.tau, self.max_history = sids, tau, max_history
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.schedule_epochs = schedule_epochs
        self.decoding, self.bf16 = decoding, bf16
        self.beam_width, self.n_edges, self.steps = beam_width, n_edges, steps
        self.positions = m = sids.length
        V = max(sids.vocab_sizes)  # positions with smaller vocabularies are padded and masked
        codes = torch.as_tensor(sids.codes)
        # int32: the exact pass reads every item's rows, and embedding_bag takes int32 as well
        rows = (codes + torch.arange(m) * V).int()
        self.register_buffer("item_index", rows, persistent=False)
        # the same rows position by position (int64, as gather wants), for a few items per user
        self.register_buffer("rows_by_position", rows.T.long().contiguous(), persistent=False)
        unused = torch.arange(V) >= torch.tensor(sids.vocab_sizes)[:, None]
        self.register_buffer("unused_codes", unused if unused.any() else None, persistent=False)
        start = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("start_items", start, persistent=False)
        self._graph: torch.Tensor | None = None
        # `unit_codes()` and (within ITEM_INPUTS_CACHE_BYTES) `item_inputs()` of the whole
        # catalogue during an evaluation
        self._unit_codes: torch.Tensor | None = None
        self._item_inputs: torch.Tensor | None = None
        self._graph_seconds = 0.0

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.codebooks = nn.Parameter(0.02 * torch.randn(m, V, hidden))
            self.pos = nn.Embedding(max_history, hidden)
            self.drop = nn.Dropout(dropout if embed_dropout is None else embed_dropout)
            gpt2 = {"attn_dropout": attn_dropout, "activation": activation, "bias": bias}
            self.blocks = nn.ModuleList(
                Block(
                    hidden,
                    heads,
                    hidden // heads,
                    d_ff,
                    dropout,
                    False,
                    packed=self.packed,
                    norm_eps=norm_eps,
                    **gpt2,
                )
                for _ in range(layers)
            )
            self.norm = nn.LayerNorm(hidden, eps=norm_eps)
            # one residual projection x + SiLU(W_p x + b_p) per code position, W_p starting at 0
            self.heads = nn.Linear(hidden, m * hidden)
            for module in (self.pos, *self.blocks.modules()):
                if isinstance(module, nn.Linear | nn.Embedding):
                    nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)  # GPT-2's initialisation
            nn.init.zeros_(self.heads.weight)

    # --- model -------------------------------------------------------------------------------

    def user_state(self, history: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Transformer state `[B, hidden]` after the last real item of right-padded histories."""
        history, length = last_items(history, length.clamp(min=1), self.max_history)
        B, T = history.shape
        ar = torch.arange(T, device=history.device)
        # right padding under causal attention: real positions never see the padding, so it
        # needs no mask; linear layers skip it (packed tokens)
        layout = Layout.of(ar < length[:, None], causal=True, packed=self.packed)
        items = layout.pack(history[..., None])[:, 0]
        recency = layout.pack((length[:, None] - 1 - ar).clamp(min=0)[..., None])[:, 0]  # 0: latest
        x = self.drop(self.item_inputs(items) + self.pos(recency))
        with self._autocast():
            # only the state after each row's last item is read
            x = last_states(self.blocks, x, layout, layout.last_rows(length))
        return self.norm(x)

    def _autocast(self):
        """bf16 matmuls where enabled: on CPUs with bf16 dot products they run several x faster."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def item_inputs(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings `[n, d]` of `items` (all when None): the mean of their m code
        embeddings (cached for the whole catalogue during an evaluation, when small enough)."""
        if self._item_inputs is not None:
            return self._item_inputs if items is None else self._item_inputs[items]
        index = self.item_index if items is None else self.item_index[items]
        return F.embedding_bag(index, self.codebooks.flatten(0, 1), mode="mean")

    def unit_codes(self) -> torch.Tensor:
        """Code embeddings `[m, V, d]` scaled to unit length (cached during an evaluation)."""
        if self._unit_codes is not None:
            return self._unit_codes
        return F.normalize(self.codebooks, dim=-1)

    def unit_states(self, h: torch.Tensor) -> torch.Tensor:
        """Each position's projected state `[m, B, d]` (float32) for user states `h`, scaled to
        length 1 / tau: its dot products with the unit code embeddings are the logits."""
        with bf16_matmuls(self.bf16):
            states = F.silu(self.heads(h)).view(len(h), self.positions, -1).add_(h[:, None])
        scale = states.norm(dim=-1, keepdim=True).clamp(min=1e-12) * self.tau
        return (states / scale).transpose(0, 1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits `[B, m, V]` (float32) of every code at every position for user states `h`:
        the cosine of each position's projected state with its code embeddings, over tau."""
        # bf16 inputs, float32 results: bf16 outputs would round cosines to steps of ~0.004,
        # i.e. logit steps of ~0.13 at tau 0.03, and tie many item scores
        with bf16_matmuls(self.bf16):
            codes = self.unit_codes().transpose(1, 2)
            logits = torch.bmm(self.unit_states(h), codes).transpose(0, 1)
        if self.unused_codes is not None:
            logits = logits.masked_fill(self.unused_codes, float("-inf"))
        return logits

    def code_table(self, states: torch.Tensor) -> torch.Tensor:
        """The logits of `unit_states` `[m, B, d]` laid out `[m * V, B]` for `sum_rows`: one row
        per code (`p * V + code`). Ranking needs no log-softmax: an item's summed code
        log-probabilities are its summed logits minus the user's sum of per-position
        logsumexps, the same for every item (and unused codes are in no item)."""
        with bf16_matmuls(self.bf16):
            return torch.bmm(self.unit_codes(), states.transpose(1, 2)).flatten(0, 1)

    def code_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits `[B, m, V]` (float32) of every code at every position: cosine / tau."""
        return self.logits(self.user_state(batch["history"], batch["length"]))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the target's code at each position, averaged over positions."""
        logits = self.code_logits(batch)
        codes = self.item_index[batch["target"]].long() % logits.shape[-1]
        return F.cross_entropy(logits.flatten(0, 1), codes.flatten())

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._graph = None  # the graph follows the code embeddings
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        opt = self.optimizer(lr=self.lr, weight_decay=self.weight_decay)
        return self.with_schedule(opt, self.warmup_steps, schedule_epochs=self.schedule_epochs)

    # --- scoring and decoding ----------------------------------------------------------------

    def code_log_probs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Code log-probabilities `[m * V, B]` of the batch's users, rows as in `code_table`."""
        return self.code_logits(batch).log_softmax(-1).flatten(1).T

    def item_scores(self, table: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over positions `[B, n]` of the `table` rows (`code_table` or `code_log_probs`)
        of `items`' codes (all items when None)."""
        index = self.item_index if items is None else self.item_index[items]
        return sum_rows(index, table).T / self.positions

    def exact_top_k(
        self, table: torch.Tensor, k: int, chunk_bytes: int = SCORE_CHUNK_BYTES
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items `[B, k]` over the whole catalogue for the users of a `code_table` and
        their summed logits, scoring a block of items at a time (their `[block, B]` scores
        within `chunk_bytes`)."""
        block = max(1, chunk_bytes // (4 * table.shape[1]))
        starts = range(0, self.num_items, block)
        # each block's item-major sums, ranked through their transposed view
        blocks = ((s, sum_rows(self.item_index[s : s + block], table).T) for s in starts)
        values, ids = running_top_k(blocks, k)
        return pad_ranked(ids, values, k)

    def build_graph(self) -> torch.Tensor:
        """The item graph of the current code embeddings (cached until the next training step)."""
        if self._graph is None:
            start = time.perf_counter()
            self._graph = item_graph(self.codebooks.detach(), self.item_index, self.n_edges)
            self._graph_seconds = time.perf_counter() - start
        return self._graph

    def _candidate_scores(self, table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Summed `table` rows `[B, C]` of per-user items `[B, C]`, added in the same order as
        `sum_rows` adds them, so graph and exact decoding agree bit for bit."""
        flat, by_user = items.flatten(), table.T  # [B, m * V] view
        total = None
        for rows in self.rows_by_position:  # [N] rows of each item's code at one position
            scores = by_user.gather(1, rows.gather(0, flat).view_as(items))
            total = scores if total is None else total.add_(scores)
        return total

    @property
    def _graph_reads_item_scores(self) -> bool:
        """Whether graph decoding scores the whole catalogue in exact decoding's vectorised pass
        and walks the graph over those scores: cheaper than looking up each candidate's codes
        while the catalogue has at most GRAPH_LOOKUP_COST items per candidate a walk scores."""
        scored = self.beam_width * (1 + self.steps * (self.n_edges + 1))
        return self.num_items <= GRAPH_LOOKUP_COST * scored

    def graph_top_k(
        self, h: torch.Tensor, user: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Graph-constrained decoding: a seeded beam, moved `steps` times to its best neighbours.

        Each user's first beam is its own slice of a permutation drawn under `seed`, so results
        do not depend on how users are batched. The final list ranks the last round's candidates
        (the beam and its neighbours), so it may be longer than the beam. A candidate scores the
        sum of its `code_table` rows, as in exact decoding; returns the items and these sums.
        """
        states = self.unit_states(h)
        if not self._graph_reads_item_scores:
            table = self.code_table(states)
            return self._walk(partial(self._candidate_scores, table), distinct_sorted, user, k)
        tops = []
        for s, us in zip(states.split(SCORE_USERS, 1), user.split(SCORE_USERS), strict=True):
            sums = sum_rows(self.item_index, self.code_table(s)).T  # [B, N], as exact decoding
            stamp = torch.empty(sums.shape, dtype=torch.int32, device=sums.device)
            score = partial(torch.gather, sums, 1)
            tops.append(self._walk(score, partial(distinct_stamped, stamp=stamp), us, k))
        return tuple(torch.cat(parts) for parts in zip(*tops, strict=True))

    def _walk(
        self, score: Callable, distinct: Callable, user: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`graph_top_k` with candidates `[B, C]` de-duplicated by `distinct` and scored by
        `score`."""
        graph = self.build_graph()
        W, N = self.beam_width, self.num_items
        cand = self.start_items[(user[:, None] * W + torch.arange(W, device=user.device)) % N]
        for _ in range(self.steps):
            beam = best_items(*distinct(cand), score, W)[0]
            cand = torch.cat([beam, graph[beam].flatten(1).long()], dim=1)
        return best_items(*distinct(cand), score, k)

    def selection_decoding(self) -> dict:
        """Model selection always scores every item exactly."""
        return {"decoding": "exact"}

    @property
    def _graph_decoding(self) -> bool:
        return self.decoding == "graph" and not self.selecting

    @torch.no_grad()
    def recommend_scored(
        self, batch: dict[str, torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k items of largest summed code logits (cosine / tau over the m positions)."""
        h = self.user_state(batch["history"], batch["length"])
        if self._graph_decoding:
            return self.graph_top_k(h, batch["user"], k)
        # the heads for the whole batch (their weights are read once), then on a CPU SCORE_USERS
        # at a time: their code table stays in a core's cache while items gather (a GPU takes
        # the whole batch at once)
        users = SCORE_USERS if h.device.type == "cpu" else len(h)
        states = self.unit_states(h).split(users, 1)
        tops = [self.exact_top_k(self.code_table(s), k) for s in states]
        return tuple(torch.cat(parts) for parts in zip(*tops, strict=True))

    def catalogue_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Exact decoding's scores, each item's mean code logit; None under graph decoding,
        which ranks only the items its walk reaches."""
        if self._graph_decoding:
            return None
        h = self.user_state(batch["history"], batch["length"])
        return self.item_scores(self.code_table(self.unit_states(h)))

    def _eval_start(self) -> None:
        super()._eval_start()
        self._unit_codes = self._item_inputs = None  # computed afresh from the weights
        with torch.no_grad():
            self._unit_codes = self.unit_codes()
            if self.num_items * self.codebooks.shape[-1] * 4 <= ITEM_INPUTS_CACHE_BYTES:
                self._item_inputs = self.item_inputs()
        if self._graph_decoding:
            self._graph = None
            self.build_graph()  # once per evaluation, timed apart from per-user inference

    def _eval_end(self, stage: str) -> None:
        super()._eval_end(stage)
        self._unit_codes = self._item_inputs = None
        if stage == "test" and self._graph_decoding:
            self.log("infer/graph_build_seconds", self._graph_seconds)
