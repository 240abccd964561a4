"""TIGER: a T5-style transformer that generates the next item's semantic ID code by code."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from grid.config import check_fields
from grid.data import last_items
from grid.errors import GridError
from grid.generators.base import (
    INVALID_SID,
    NO_ITEM,
    PipelineInputs,
    Recommender,
    pad_ranked,
)
from grid.generators.beam_search import ConstrainedBeamSearch, ExhaustiveSearch, PrefixTable
from grid.generators.layers import Block, Dropout, Layout, RelativeBias, RMSNorm
from grid.metrics import KS
from grid.sids import SemanticIDs

log = logging.getLogger(__name__)

LR_DECAYS = ("constant", "cosine")
ARCHITECTURES = ("encoder_decoder", "decoder_only")
DECODINGS = ("constrained", "free", "exhaustive")
PARAM_CHOICES = {"architecture": ARCHITECTURES, "decoding": DECODINGS, "lr_decay": LR_DECAYS}
PARAM_RANGES = {
    "d_model": "[1, inf)",
    "num_heads": "[1, inf)",
    "head_dim": "[1, inf)",
    "d_ff": "[1, inf)",
    "encoder_layers": "[0, inf)",
    "decoder_layers": "[1, inf)",
    "dropout": "[0, 1)",
    "user_tokens": "[0, inf)",
    "max_history": "[1, inf)",
    "lr": "(0, inf)",
    "weight_decay": "[0, inf)",
    "warmup_steps": "[0, inf)",
    "beam_width": "[1, inf)",
    "mlp_layers": "[1, inf)",
}


def user_bucket(user: torch.Tensor, buckets: int) -> torch.Tensor:
    """Hash user ids into `buckets` (multiplicative hashing, so neighbouring ids spread out)."""
    return (user * 2654435761) % (2**32) % buckets


@dataclass
class ItemGroup:
    """A group of items to decode among: their SIDs (row i is item `items[i]`'s) and prefixes."""

    items: torch.Tensor  # global ids `[n]`, ascending
    sids: SemanticIDs
    prefixes: PrefixTable
    unique_codes: torch.Tensor


class TIGER(Recommender):
    """Generative retrieval over semantic IDs (Rajput et al., 2023), as configured in GRID.

    The history's items become their SID tokens (each SID position has its own vocabulary slice),
    optionally each followed by a separator token; the model is trained to emit the next item's
    SID and decodes with beam search. `t5` builds the HuggingFace T5 stacks GRID trains (relative
    position buckets shared by each stack's layers, RMS norms, unscaled attention, the
    PyTorch-default init GRID resets them to); otherwise learned absolute positions, LayerNorm,
    dk**-0.5 scaling and N(0, 0.02) init.
    """

    consumes = frozenset({"sids"})

    @classmethod
    def check_params(cls, ks: tuple[int, ...] = KS, **params) -> None:
        check_fields("generator", params, PARAM_RANGES, PARAM_CHOICES)
        beam_width, largest_k = params.get("beam_width", 20), max(ks)
        if params.get("decoding") != "exhaustive" and beam_width < largest_k:
            raise GridError(
                f"generator.beam_width={beam_width} is smaller than the largest K ({largest_k}) "
                f"of Recall/NDCG@K: set beam_width >= {largest_k}"
            )

    @classmethod
    def build(cls, inputs: PipelineInputs, **params) -> TIGER:
        if inputs.sids is None:
            raise GridError(
                "generator=tiger needs semantic IDs: configure a tokenizer stage (e.g. rkmeans)"
            )
        return cls(inputs.sids, **params)

    def __init__(
        self,
        sids: SemanticIDs,
        d_model: int = 128,
        num_heads: int = 6,
        head_dim: int = 64,
        d_ff: int = 1024,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        dropout: float = 0.15,
        t5: bool = True,
        mlp_layers: int = 2,
        item_separator: bool = False,
        user_tokens: int = 0,
        architecture: str = "encoder_decoder",
        max_history: int = 20,
        lr: float = 5e-4,
        weight_decay: float = 1e-6,
        warmup_steps: int = 0,
        lr_decay: str = "constant",
        decoding: str = "constrained",
        beam_width: int = 20,
        bf16: bool = True,
        seed: int = 0,
        **kwargs,
    ):
        self.check_params(
            d_model=d_model,
            num_heads=num_heads,
            head_dim=head_dim,
            d_ff=d_ff,
            encoder_layers=encoder_layers,
            decoder_layers=decoder_layers,
            dropout=dropout,
            user_tokens=user_tokens,
            architecture=architecture,
            max_history=max_history,
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            lr_decay=lr_decay,
            decoding=decoding,
            beam_width=beam_width,
            mlp_layers=mlp_layers,
            ks=kwargs.get("ks", KS),
        )
        super().__init__(sids.num_items, **kwargs)
        self.save_hyperparameters(ignore=["sids"])
        self.sids, self.architecture, self.decoding = sids, architecture, decoding
        self.lr, self.weight_decay, self.max_history = lr, weight_decay, max_history
        self.warmup_steps, self.lr_decay = warmup_steps, lr_decay
        self.user_tokens, self.beam_width, self.bf16 = user_tokens, beam_width, bf16
        self.t5 = t5
        L = self.levels = sids.length
        self.vocab_sizes = sids.vocab_sizes
        offsets = [0]
        for v in self.vocab_sizes:
            offsets.append(offsets[-1] + v)
        self.offsets = offsets
        self.pad = offsets[-1] + user_tokens  # user tokens sit between the SID tokens and pad
        self.bos = self.pad + 1
        self.sep = self.bos + 1 if item_separator else None  # after each history item
        self.register_buffer("item_codes", torch.as_tensor(sids.codes), persistent=False)
        self.register_buffer("sid_offsets", torch.tensor(offsets[:-1]), persistent=False)
        item_tokens = self.item_codes + self.sid_offsets
        if item_separator:
            item_tokens = F.pad(item_tokens, (0, 1), value=self.sep)
        width = self.item_width = item_tokens.shape[1]
        item_tokens = torch.cat([item_tokens, torch.full((1, width), self.pad)])  # row -1: padding
        self.register_buffer("item_tokens", item_tokens, persistent=False)
        self.register_buffer("unique_codes", torch.as_tensor(sids.unique_codes), persistent=False)
        self.prefixes = PrefixTable(sids.unique_codes, self.vocab_sizes)
        if decoding == "constrained" and beam_width > sids.num_unique:
            log.warning(
                "generator.beam_width=%d exceeds the %d valid SIDs: constrained decoding keeps "
                "at most %d beams, with the same result",
                beam_width,
                sids.num_unique,
                sids.num_unique,
            )
        self.seed = seed  # also draws among items that share a SID

        with torch.random.fork_rng():
            torch.manual_seed(seed)
            prompt = (user_tokens > 0) + max_history * width
            self.embed = nn.Embedding(self.bos + 1 + item_separator, d_model)
            self.drop = Dropout(dropout, self.packed)
            args = (d_model, num_heads, head_dim, d_ff, dropout)
            kw = dict(t5=t5, mlp_layers=mlp_layers, packed=self.packed)
            norm = RMSNorm if t5 else lambda d: nn.LayerNorm(d, bias=False)
            if architecture == "encoder_decoder":
                if t5:
                    self.enc_rel = RelativeBias(num_heads, bidirectional=True)
                    self.dec_rel = RelativeBias(num_heads, bidirectional=False)
                else:
                    self.pos = nn.Embedding(prompt, d_model)
                    self.dec_pos = nn.Embedding(L, d_model)
                self.encoder = nn.ModuleList(
                    Block(*args, cross=False, **kw) for _ in range(encoder_layers)
                )
                self.enc_norm = norm(d_model)
                self.decoder = nn.ModuleList(
                    Block(*args, cross=True, **kw) for _ in range(decoder_layers)
                )
            else:
                if t5:
                    self.dec_rel = RelativeBias(num_heads, bidirectional=False)
                else:
                    self.pos = nn.Embedding(prompt + L, d_model)
                self.decoder = nn.ModuleList(
                    Block(*args, cross=False, **kw) for _ in range(decoder_layers)
                )
            self.dec_norm = norm(d_model)
            self.head = nn.Linear(d_model, offsets[-1], bias=False)
            if not t5:  # GRID resets its T5 stacks to the PyTorch defaults the modules come with
                self.apply(self._init)
        self._invalid = self._decoded = 0
        self._group_tables: dict[str, ItemGroup | None] | None = None  # built by `_item_groups`

    def _autocast(self):
        """bf16 matmuls where enabled: on CPUs with bf16 dot products they run ~3x faster."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # --- inputs -------------------------------------------------------------------------------

    def _prompt(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded history tokens `[B, S]` (optionally after a user token) and their count."""
        history, length = last_items(batch["history"], batch["length"], self.max_history)
        rows = torch.where(history < 0, self.num_items, history)
        tokens = self.item_tokens[rows].flatten(1)
        count = length * self.item_width
        if self.user_tokens:
            user = self.offsets[-1] + user_bucket(batch["user"], self.user_tokens)
            tokens = torch.cat([user[:, None], tokens], dim=1)
            count = count + 1
        return tokens, count

    def _sid_tokens(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.sid_offsets

    def _level_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        w = self.head.weight[self.offsets[level] : self.offsets[level + 1]]
        return F.linear(h, w)

    # --- full-sequence forward (training, and the uncached reference) ---------------------------

    def _encode(self, tokens, count):
        """Packed encoder states `[N, d]` and their layout."""
        ar = torch.arange(tokens.shape[1], device=tokens.device)
        keep = (ar < count[:, None]) | (ar == 0)  # an empty history still attends to something
        layout = Layout.of(keep, packed=self.packed)
        x = self.embed(layout.pack(tokens)[:, 0])
        bias = None
        if self.t5:  # positions count from the first token; padding sits after the last
            bias = self.enc_rel(ar[None, :] - ar[:, None])[None]
        else:
            x = x + self.pos(layout.pack(ar.expand_as(tokens))[:, 0])
        x = self.drop(x)
        for block in self.encoder:
            x = block(x, layout, bias=bias)[0]
        return self.enc_norm(x), layout

    def _run_decoder_only(self, tokens, count, tail):
        """Run the prompt, right-aligned and followed by `tail` `[B, t]`, through the decoder.

        Returns states `[B, S + t, d]`, each layer's keys/values, the key mask and positions.
        """
        B, S = tokens.shape
        shift = S - count
        ar = torch.arange(S + tail.shape[1], device=tokens.device)
        seq = torch.cat([tokens.gather(1, (ar[None, :S] - shift[:, None]) % S), tail], dim=1)
        pos = (ar[None] - shift[:, None]).clamp(min=0)
        keep = ar[None] >= shift[:, None]
        # padded queries see themselves so no softmax row is empty
        eye = torch.eye(len(ar), dtype=torch.bool, device=ar.device)
        mask = (ar[:, None] >= ar[None]) & keep[:, None, :] | eye
        layout = Layout.of(keep, mask=mask[:, None], packed=self.packed)
        x = self.embed(layout.pack(seq)[:, 0])
        bias = None
        if self.t5:  # grid offsets are offsets between real tokens: the left padding cancels out
            bias = self.dec_rel(ar[None, :] - ar[:, None])[None]
        else:
            x = x + self.pos(layout.pack(pos)[:, 0])
        x = self.drop(x)
        kvs = []
        for block in self.decoder:
            x, k, v = block(x, layout, bias=bias)
            kvs.append((k, v))
        return layout.pad(self.dec_norm(x)), kvs, keep, pos

    def forward(self, batch: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Decoder states `[B, L, d]` predicting each level of target `codes` `[B, L]`."""
        tokens, count = self._prompt(batch)
        B, L = codes.shape
        bos = torch.full((B, 1), self.bos, device=codes.device)
        dec_in = torch.cat([bos, self._sid_tokens(codes)[:, :-1]], dim=1)
        if self.architecture == "decoder_only":
            return self._run_decoder_only(tokens, count, dec_in)[0][:, -L:]
        memory, mem_layout = self._encode(tokens, count)
        layout = Layout(B, L, causal=True)
        x, bias = self.embed(dec_in), None
        if self.t5:
            ar = torch.arange(L, device=codes.device)
            bias = self.dec_rel(ar[None, :] - ar[:, None])[None]
        else:
            x = x + self.dec_pos.weight
        x = self.drop(x).flatten(0, 1)
        for block in self.decoder:
            kv = block.cross.memory_kv(memory, mem_layout)
            x = block(x, layout, memory_kv=kv, memory_mask=mem_layout.mask, bias=bias)[0]
        return self.dec_norm(x).view(B, L, -1)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over levels of the cross-entropy within each level's vocabulary."""
        codes = self.item_codes[batch["target"]]
        with self._autocast():
            h = self(batch, codes)
            logits = [self._level_logits(h[:, level], level) for level in range(self.levels)]
        losses = [F.cross_entropy(x.float(), codes[:, level]) for level, x in enumerate(logits)]
        return sum(losses) / self.levels

    def configure_optimizers(self):
        opt = self.optimizer(lr=self.lr, weight_decay=self.weight_decay, foreach=True)
        if not self.warmup_steps and self.lr_decay == "constant":
            return opt
        total = max(self.trainer.estimated_stepping_batches, self.warmup_steps + 1)

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / self.warmup_steps
            if self.lr_decay == "cosine":
                progress = (step - self.warmup_steps) / (total - self.warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            return 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def uncached_logprob(self, batch: dict[str, torch.Tensor], codes: torch.Tensor) -> torch.Tensor:
        """Log-likelihood `[B, C]` of SIDs `codes` `[B, C, L]` by full recomputation (reference)."""
        B, C, L = codes.shape
        rep = {k: v.repeat_interleave(C, dim=0) for k, v in batch.items()}
        flat = codes.reshape(B * C, L)
        h = self(rep, flat)
        total = 0
        for level in range(L):
            logp = self._level_logits(h[:, level], level).float().log_softmax(-1)
            total = total + logp.gather(1, flat[:, level : level + 1])[:, 0]
        return total.view(B, C)

    # --- cached decoding -----------------------------------------------------------------------

    def _start(self, batch: dict[str, torch.Tensor]) -> dict:
        """Per-user state shared by every beam: encoder keys/values or the prompt's cache."""
        tokens, count = self._prompt(batch)
        if self.architecture == "encoder_decoder":
            memory, layout = self._encode(tokens, count)
            pad = None if layout.mask is None else ~layout.mask
            state = {"cross": [(*b.cross.memory_kv(memory, layout), pad) for b in self.decoder]}
            if self.t5:  # every decoder step's relative bias, once: steps slice it
                steps = torch.arange(self.levels, device=tokens.device)
                state["dec_bias"] = self.dec_rel(steps[None] - steps[:, None])
            return state
        bos = torch.full_like(tokens[:, :1], self.bos)
        h, kvs, keep, pos = self._run_decoder_only(tokens, count, bos)
        # the prompt ends with bos, so its last state already predicts level 0
        pad = ~keep[:, None, None, :]
        prefix = [(k, v, pad) for k, v in kvs]
        return {"prefix": prefix, "bos_pos": pos[:, -1], "h0": h[:, -1:, None]}

    def _decode(self, state: dict, tokens: torch.Tensor, start: int, caches: list | None):
        """States `[B, W, t, d]` for decoder tokens `[B, W, t]` at decoder steps start.. ."""
        caches = caches or [None] * len(self.decoder)
        t = tokens.shape[-1]
        # under autocast keep the beams' residual stream in bf16 too: it halves memory traffic
        dev = tokens.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        x, bias = self.embed(tokens), None
        if self.architecture == "encoder_decoder":
            if self.t5:  # only the new queries' rows: keys are decoder steps 0 .. start+t-1
                bias = (None, state["dec_bias"][:, start : start + t, : start + t])
            else:
                x = x + self.dec_pos.weight[start : start + t]
            x = x.to(dtype)
            for i, block in enumerate(self.decoder):
                x, caches[i] = block.step(
                    x, cache=caches[i], cross_static=state["cross"][i], bias=bias
                )
        else:
            steps = torch.arange(start, start + t, device=tokens.device)
            if self.t5:  # keys: the prompt grid (bos last), then decoder steps 1 .. start+t-1
                T = state["prefix"][0][0].shape[2]
                prompt = torch.arange(T, device=tokens.device)[None] - (T - 1 + steps[:, None])
                decoded = torch.arange(1, start + t, device=tokens.device)[None] - steps[:, None]
                bias = (self.dec_rel(prompt)[None], self.dec_rel(decoded))
            else:
                x = x + self.pos(state["bos_pos"][:, None, None] + steps)
            x = x.to(dtype)
            for i, block in enumerate(self.decoder):
                x, caches[i] = block.step(
                    x, self_static=state["prefix"][i], cache=caches[i], bias=bias
                )
        return self.dec_norm(x), caches

    def _beam_step(self, state: dict, level: int, codes, parents) -> torch.Tensor:
        """Log-probs `[B, W, V_level]` for beams whose last code is `codes` `[B, W]`."""
        caches = state.get("caches")
        if caches is not None and caches[0] is not None:  # follow the surviving beams
            rows = parents + torch.arange(len(parents), device=parents.device)[:, None] * (
                caches[0][0].shape[0] // len(parents)
            )
            rows = rows.flatten()
            caches = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in caches]
        if self.architecture == "decoder_only":
            if level == 0:
                h = state["h0"]
            else:
                h, caches = self._decode(
                    state, (codes + self.offsets[level - 1])[..., None], level, caches
                )
        else:
            if level == 0:
                B = len(state["cross"][0][0])
                tokens = torch.full((B, 1, 1), self.bos, device=self.item_tokens.device)
            else:
                tokens = (codes + self.offsets[level - 1])[..., None]
            h, caches = self._decode(state, tokens, level, caches)
        state["caches"] = caches
        return self._level_logits(h[:, :, -1], level).float().log_softmax(-1)

    def _score_codes(self, state: dict, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced log-likelihood `[B, C]` of every user for each SID in `codes` `[C, L]`."""
        C, L = codes.shape
        tokens = self._sid_tokens(codes)
        if self.architecture == "encoder_decoder":
            B = len(state["cross"][0][0])
            bos = torch.full((C, 1), self.bos, device=codes.device)
            h, _ = self._decode(state, torch.cat([bos, tokens[:, :-1]], 1).expand(B, C, L), 0, None)
        else:
            B = len(state["h0"])
            h, _ = self._decode(state, tokens[:, :-1].expand(B, C, L - 1), 1, None)
            h = torch.cat([state["h0"].expand(B, C, 1, -1), h], dim=2)
        total = 0
        for level in range(L):
            logp = self._level_logits(h[:, :, level], level).float().log_softmax(-1)
            index = codes[:, level].expand(B, C)[..., None]
            total = total + logp.gather(2, index)[..., 0]
        return total

    @torch.no_grad()
    def search(
        self, batch: dict[str, torch.Tensor], k: int, group: ItemGroup | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Decoded SID groups `[B, W]` (-1: invalid or none) and their log-likelihoods; with
        `group`, rows of `group.sids.unique_codes` (constrained or exhaustive decoding)."""
        with self._autocast():
            return self._search(batch, k, group)

    def selection_decoding(self) -> dict:
        """Model selection decodes with one fixed setting, so the cached model never depends on
        the inference-only `decoding` and `beam_width`."""
        return {"decoding": "constrained", "beam_width": max(self.ks)}

    def _decoding(self) -> tuple[str, int]:
        """The (decoding, beam width) in force: the selection setting while selecting."""
        if self.selecting:
            setting = self.selection_decoding()
            decoding, width = setting["decoding"], setting["beam_width"]
        else:
            decoding, width = self.decoding, self.beam_width
        if decoding == "constrained":  # no level has more valid prefixes than there are SIDs
            width = min(width, self.sids.num_unique)
        return decoding, width

    def _search(self, batch, k, group: ItemGroup | None = None):
        state = self._start(batch)
        decoding, width = self._decoding()
        prefixes, unique_codes = self.prefixes, self.unique_codes
        if group is not None:
            prefixes, unique_codes = group.prefixes, group.unique_codes
            width = min(width, len(unique_codes))
        if decoding == "exhaustive":
            exhaustive = ExhaustiveSearch(unique_codes, chunk=256)
            return exhaustive.search(lambda codes: self._score_codes(state, codes), k)
        beams = ConstrainedBeamSearch(prefixes, width, decoding == "constrained")
        step = lambda level, codes, parents: self._beam_step(state, level, codes, parents)  # noqa: E731
        return beams.search(step, len(batch["length"]), device=self.item_tokens.device)

    @torch.no_grad()
    def recommend_scored(
        self, batch: dict[str, torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best decoded SIDs' items and beam log-probabilities; SIDs that are no item's
        (free decoding) follow the valid ones as INVALID_SID. Where several items share a SID,
        one is drawn per (seed, user, SID): the same draw in any batch and any evaluation."""
        groups, scores = self.search(batch, k)
        real = scores > float("-inf")
        invalid = (groups < 0) & real
        if self._decoding()[0] == "free":
            self._invalid += int(invalid.sum())
            self._decoded += int(real.sum())
        order = torch.argsort((groups < 0).to(torch.uint8), dim=1, stable=True)
        groups, scores, invalid = (t.gather(1, order)[:, :k] for t in (groups, scores, invalid))
        items = self.sids.pick_items(groups, batch.get("user"), self.seed)
        return pad_ranked(items.masked_fill(invalid, INVALID_SID), scores, k)

    def _item_group(self, members: torch.Tensor) -> ItemGroup | None:
        """Decoding restricted to the items of bool `members [num_items]`; None if it has none."""
        items = members.cpu().nonzero()[:, 0]
        if not len(items):
            return None
        sids = SemanticIDs(self.sids.codes[items.numpy()], self.vocab_sizes, self.sids.ordered)
        device = self.item_tokens.device
        return ItemGroup(
            items.to(device),
            sids,
            PrefixTable(sids.unique_codes, self.vocab_sizes).to(device),
            torch.as_tensor(sids.unique_codes, device=device),
        )

    def _group_ranked(
        self, batch: dict[str, torch.Tensor], k: int, group: ItemGroup
    ) -> torch.Tensor:
        """Item ids `[B, k]` of decoding restricted to `group`, best first; NO_ITEM past the
        group's SIDs. A SID shared with another group's items yields one of this group's."""
        groups, scores = self.search(batch, k, group)
        groups, scores = groups[:, :k], scores[:, :k]  # constrained: none (-1) only at the end
        local = group.sids.pick_items(groups, batch.get("user"), self.seed)
        items = torch.where(local >= 0, group.items[local.clamp(min=0)], NO_ITEM)
        return pad_ranked(items, scores, k)[0]

    def _item_groups(self, batch: dict[str, torch.Tensor]) -> None:
        """SETRec's warm/cold item groups: for the users whose target is in a group, decode
        among the group's SIDs only (a prefix table per group, built once per evaluation).
        Free decoding cannot keep its output inside a group, so it reports no item groups."""
        if self._decoding()[0] == "free":
            return
        if self._group_tables is None:
            self._group_tables = {
                "warm_items/": self._item_group(self.warm_items),
                "cold_items/": self._item_group(~self.warm_items),
            }
        k = max(self.ks)
        for prefix, rows in (("warm_items/", batch["warm"]), ("cold_items/", ~batch["warm"])):
            group = self._group_tables[prefix]
            rows_batch = {name: value[rows] for name, value in batch.items()}
            target = rows_batch["target"]
            ranked = torch.full((len(target), k), NO_ITEM, device=target.device)
            if group is not None and len(target):
                ranked = self._group_ranked(rows_batch, k, group)
            count = 0 if group is None else len(group.items)
            users = torch.ones_like(target, dtype=torch.bool)
            self._totals.update_items(prefix, ranked, target, users, count)

    def _eval_start(self) -> None:
        super()._eval_start()
        self._invalid = self._decoded = 0
        self._group_tables = None  # `warm_items` may differ from the last evaluation's

    def _eval_end(self, stage: str) -> None:
        super()._eval_end(stage)
        if self._decoding()[0] == "free":
            self.log(f"{stage}/invalid_rate", self._invalid / max(self._decoded, 1))
