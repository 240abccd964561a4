"""TIGER: a T5-style transformer that generates the next item's semantic ID code by code."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grid.config import check_fields
from grid.data import last_items
from grid.errors import GridError
from grid.generators.base import INVALID_SID, PipelineInputs, Recommender, pad_ranked
from grid.generators.beam_search import ConstrainedBeamSearch, ExhaustiveSearch, PrefixTable
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
T5_BUCKETS, T5_MAX_DISTANCE = 32, 128  # HF T5Config defaults, which GRID keeps
FLASH_MIN_KEYS = 40  # bf16 CPU inference: fused attention from this many keys on (see `attend`)


def cached_attention(q, static=None, dynamic=None, bias=None, scale=None):
    """Attention of beam queries over per-user keys shared by all beams and per-beam keys.

    q `[B, W, t, h, dk]` (beams x new tokens); static `(k, v, keep)`: k, v `[B, h, T, dk]`,
    keep `[B, T]` bool or None; dynamic `(k, v)` `[B*W, h, S, dk]`, the last t positions the
    queries' own. bias `(static [1, h, t, T] | None, dynamic [h, t, S] | None)` is added to the
    scores (T5 relative positions); scale defaults to dk**-0.5. Shared keys are never copied per
    beam: beams fold into the query length. Returns `[B, W, t, h*dk]`.
    """
    B, W, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    static_bias, dynamic_bias = (None, None) if bias is None else bias
    T = 0
    parts = []
    if static is not None:
        k, v, keep = static
        T = k.shape[2]
        s = q.view(B, W * t, h, dk).transpose(1, 2) @ k.transpose(-1, -2)  # [B, h, W*t, T]
        if scale != 1:
            s = s * scale
        if keep is not None:
            s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        if static_bias is not None:
            s = (s.view(B, h, W, t, T) + static_bias[:, :, None]).view(B, h, W * t, T)
        if dynamic is None:
            return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, W, t, h * dk)
        parts.append(s.view(B, h, W, t, T).transpose(1, 2).reshape(B * W, h, t, T))
    k, v = dynamic
    qd = q.reshape(B * W, t, h, dk).transpose(1, 2)
    s = qd @ k.transpose(-1, -2)  # [B*W, h, t, S]
    if scale != 1:
        s = s * scale
    if dynamic_bias is not None:
        s = s + dynamic_bias
    if t > 1:
        S = k.shape[2]
        future = torch.ones(t, S, dtype=torch.bool, device=q.device).triu(S - t + 1)
        s = s.masked_fill(future, float("-inf"))
    parts.append(s)
    p = torch.cat(parts, dim=-1).softmax(-1)
    out = p[..., T:] @ v  # [B*W, h, t, dk]
    if static is not None:
        ps = p[..., :T].reshape(B, W, h, t, T).transpose(1, 2).reshape(B, h, W * t, T)
        out = out + (ps @ static[1]).view(B, h, W, t, dk).transpose(1, 2).reshape(B * W, h, t, dk)
    return out.view(B, W, h, t, dk).transpose(2, 3).reshape(B, W, t, h * dk)


def packed_rows(n: int) -> int:
    """`n` rounded up to a multiple of an eighth of its power of two (at least 16).

    oneDNN builds a matmul kernel for every new row count (about 4 ms each on AMX CPUs, more
    than the matmul itself at our shapes); rounded counts recur from batch to batch and reuse
    the kernels it has built, for at most 1/8 more rows.
    """
    step = max(16, 1 << max(n.bit_length() - 4, 0))
    return -(-n // step) * step


@dataclass
class Layout:
    """Where packed tokens `[N, d]` sit in a padded `[B, T]` grid, and which keys they see.

    Linear layers run on the packed tokens only; attention runs on the padded grid.
    """

    B: int
    T: int
    # flat grid positions of the packed rows: the real tokens in grid order, then padding
    # positions that round the row count up (`packed_rows`); None: no padding
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # bool `[B, 1, T or 1, T]`: keys each query may see
    causal: bool = False
    keep: torch.Tensor | None = None  # bool `[B, T]`: the real tokens; None: all

    @classmethod
    def of(cls, keep: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False):
        """The layout of real tokens `keep` `[B, T]`. Without a `mask`, bidirectional layouts
        hide the padded keys; causal ones must be right-padded, so that no real query sees the
        padding and none is needed."""
        B, T = keep.shape
        if bool(keep.all()):
            return cls(B, T, None, mask, causal)
        flat = keep.flatten()
        index = flat.nonzero()[:, 0]
        extra = min(packed_rows(len(index)), B * T) - len(index)
        if extra:
            index = torch.cat([index, (~flat).nonzero()[:extra, 0]])
        if mask is None and not causal:
            mask = keep[:, None, None, :]
        return cls(B, T, index, mask, causal, keep)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return x.view(self.B, self.T, -1)
        out = x.new_zeros(self.B * self.T, x.shape[-1])
        return out.index_copy(0, self.index, x).view(self.B, self.T, -1)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(self.B * self.T, -1)
        return x if self.index is None else x.index_select(0, self.index)


def attend(q, k, v, mask=None, causal=False, scale=None, bias=None):
    """Attention `[B, h, Tq, dk]`; mask is bool (True: may attend), bias an additive
    `[1, h, Tq, Tk]` (T5 relative positions) broadcast over the batch."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    # CPU flash attention is slow in bf16 at our short lengths, above all its backward; without
    # gradients it overtakes the plain product from about 40 keys on (bias kept in fp32 below)
    flash = not torch.is_grad_enabled() and bias is None and Tk >= FLASH_MIN_KEYS
    if q.dtype != torch.bfloat16 or q.device.type != "cpu" or flash:
        if bias is not None:  # SDPA takes one mask: the bias, -inf where attention is barred
            if causal:
                future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(1)
                bias = bias.masked_fill(future, float("-inf"))
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            mask, causal = mask.to(q.dtype), False
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale
        )
    s = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-1, -2)
    if bias is not None:
        s = s.float() + bias
    if causal:
        future = torch.ones(Tq, Tk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.float().softmax(-1).to(v.dtype) @ v


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask costs a fraction of torch's Bernoulli sampler (which, at our
    shapes, took a fifth of a TIGER training step): 16-bit uniform draws from numpy's PCG64,
    seeded from torch's generator (so `torch.manual_seed` and saved RNG states still fix every
    mask), kept with probability 1 - p to within 2**-16 and rescaled exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu":
            return super().forward(x)
        dropped = round(self.p * 65536)
        seed = int(torch.randint(2**62, (), dtype=torch.int64))
        words = np.random.default_rng(seed).bit_generator.random_raw((x.numel() + 3) // 4)
        bits = torch.from_numpy(words.view(np.int16)[: x.numel()]).view(x.shape)
        keep = (bits >= dropped - 32768).view(torch.uint8)  # uint8 converts ~8x faster than bool
        return x * keep.to(x.dtype).mul_(65536 / (65536 - dropped))


class RMSNorm(nn.Module):
    """T5LayerNorm: scales by the root mean square (no mean subtraction, no bias), in fp32.

    Under autocast the output is in the autocast dtype, which the next matmul casts it to anyway.
    """

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x).to(dtype)


def relative_buckets(rel, bidirectional, num_buckets=T5_BUCKETS, max_distance=T5_MAX_DISTANCE):
    """T5's bucket of each relative position `key - query`: exact up to half the buckets, then
    logarithmic up to max_distance; unidirectional buckets fold every future position into 0."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = (-rel).clamp(min=0)
    exact = num_buckets // 2
    large = (
        exact
        + (
            torch.log(rel.clamp(min=exact).float() / exact)
            / math.log(max_distance / exact)
            * (num_buckets - exact)
        ).long()
    )
    return buckets + torch.where(rel < exact, rel, large.clamp(max=num_buckets - 1))


class RelativeBias(nn.Module):
    """A stack's T5 relative position bias: one learned scalar per head and bucket, computed
    once per forward and shared by all the stack's self-attention layers."""

    def __init__(self, heads: int, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.embed = nn.Embedding(T5_BUCKETS, heads)

    def forward(self, rel: torch.Tensor) -> torch.Tensor:
        """Bias `[..., h, q, k]` (fp32) for relative positions `rel` `[..., q, k]`."""
        return self.embed(relative_buckets(rel, self.bidirectional)).movedim(-1, -3)


def feed_forward(d_model: int, d_ff: int, layers: int, dropout: float, t5: bool) -> nn.Sequential:
    """The block MLP. One hidden layer: d -> d_ff -> d with ReLU and no biases (T5's
    DenseReluDense, with its inner dropout when t5). More: GRID's T5MultiLayerFF (`mlp_layers`),
    `layers` hidden ReLU layers of d_ff, with biases and a dropout after each later linear."""
    if layers == 1:
        inner = [Dropout(dropout)] if t5 else []
        return nn.Sequential(
            nn.Linear(d_model, d_ff, bias=False),
            nn.ReLU(inplace=True),
            *inner,
            nn.Linear(d_ff, d_model, bias=False),
        )
    dims = [d_ff] * layers + [d_model]
    mods = [nn.Linear(d_model, d_ff)]
    for i in range(1, len(dims)):
        mods += [nn.ReLU(inplace=True), nn.Linear(dims[i - 1], dims[i]), Dropout(dropout)]
    return nn.Sequential(*mods)


class Attention(nn.Module):
    """Multi-head attention with T5-style head size (inner dim = heads x head_dim).

    `scale` multiplies the scores: None is dk**-0.5; T5 uses 1 (its init absorbs the scaling).
    """

    def __init__(self, d_model: int, heads: int, head_dim: int, cross: bool, scale=None):
        super().__init__()
        self.heads, self.head_dim, self.cross, self.scale = heads, head_dim, cross, scale
        inner = heads * head_dim
        if cross:
            self.q = nn.Linear(d_model, inner, bias=False)
            self.kv = nn.Linear(d_model, 2 * inner, bias=False)
        else:
            self.qkv = nn.Linear(d_model, 3 * inner, bias=False)
        self.out = nn.Linear(inner, d_model, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
        # [B, T, n*h*dk] -> n tensors [B, h, T, dk]
        B, T, _ = x.shape
        # unbind before transposing: the backward then stacks straight into the linear's layout
        parts = x.view(B, T, n, self.heads, self.head_dim).unbind(2)
        return tuple(p.transpose(1, 2) for p in parts)

    def memory_kv(self, memory: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, ...]:
        """Keys and values `[B, h, T, dk]` of packed encoder states."""
        return self._heads(layout.pad(self.kv(memory)), 2)

    def forward(self, x, layout: Layout, memory_kv=None, memory_mask=None, bias=None):
        """Attention over packed tokens x `[N, d]`; returns output and padded keys/values.

        `bias` (self-attention): an additive `[1, h, T, T]` on top of the layout's mask.
        """
        if self.cross:
            (q,), (k, v) = self._heads(layout.pad(self.q(x)), 1), memory_kv
            y = attend(q, k, v, mask=memory_mask, scale=self.scale)
        else:
            q, k, v = self._heads(layout.pad(self.qkv(x)), 3)
            y = attend(q, k, v, layout.mask, layout.causal, self.scale, bias)
        return self.out(layout.pack(y.transpose(1, 2))), k, v

    def last(self, x: torch.Tensor, layout: Layout, rows: torch.Tensor) -> torch.Tensor:
        """Self-attention output `[B, d]` of the last real token of each row of a causal,
        right-padded layout (packed positions `rows`); the other tokens serve as keys only."""
        B, h, dk = layout.B, self.heads, self.head_dim
        w = self.qkv.weight  # rows: q, then k and v
        q = F.linear(x[rows], w[: h * dk]).view(B, h, 1, dk)
        k, v = self._heads(layout.pad(F.linear(x, w[h * dk :])), 2)
        # the row's last token sees every real token of its row, never the padding
        keep = None if layout.keep is None else layout.keep[:, None, None, :]
        return self.out(attend(q, k, v, mask=keep, scale=self.scale).reshape(B, h * dk))

    def step(self, x, static=None, cache=None, bias=None):
        """Cached attention for beams x `[B, W, t, d]`; returns output and the grown cache."""
        B, W, t, _ = x.shape
        h, dk = self.heads, self.head_dim
        if self.cross:
            q = self.q(x).view(B, W, t, h, dk)
            return self.out(cached_attention(q, static=static, scale=self.scale)), None
        qkv = self.qkv(x).view(B, W, t, 3, h, dk)
        k, v = (qkv[:, :, :, i].reshape(B * W, t, h, dk).transpose(1, 2) for i in (1, 2))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        y = cached_attention(
            qkv[:, :, :, 0], static=static, dynamic=(k, v), bias=bias, scale=self.scale
        )
        return self.out(y), (k, v)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention, ReLU MLP.

    t5: RMS norms and unscaled attention scores (HF T5); else bias-free LayerNorm and dk**-0.5.
    """

    def __init__(self, d_model, heads, head_dim, d_ff, dropout, cross, t5=False, mlp_layers=1):
        super().__init__()
        norm = RMSNorm if t5 else lambda d: nn.LayerNorm(d, bias=False)
        scale = 1.0 if t5 else None
        self.norm1 = norm(d_model)
        self.attn = Attention(d_model, heads, head_dim, cross=False, scale=scale)
        if cross:
            self.norm_x = norm(d_model)
            self.cross = Attention(d_model, heads, head_dim, cross=True, scale=scale)
        else:
            self.cross = None
        self.norm2 = norm(d_model)
        self.mlp = feed_forward(d_model, d_ff, mlp_layers, dropout, t5)
        self.drop = Dropout(dropout)

    def forward(self, x, layout: Layout, memory_kv=None, memory_mask=None, bias=None):
        a, k, v = self.attn(self.norm1(x), layout, bias=bias)
        x = x + self.drop(a)
        if self.cross is not None:
            a = self.cross(self.norm_x(x), layout, memory_kv=memory_kv, memory_mask=memory_mask)[0]
            x = x + self.drop(a)
        return x + self.drop(self.mlp(self.norm2(x))), k, v

    def last(self, x: torch.Tensor, layout: Layout, rows: torch.Tensor) -> torch.Tensor:
        """The block's output `[B, d]` at the last real token of each row of a causal layout
        (packed positions `rows`), computed for those tokens alone: what a model reading only
        the final state needs from its last block."""
        x = x[rows] + self.drop(self.attn.last(self.norm1(x), layout, rows))
        return x + self.drop(self.mlp(self.norm2(x)))

    def step(self, x, self_static=None, cache=None, cross_static=None, bias=None):
        a, cache = self.attn.step(self.norm1(x), static=self_static, cache=cache, bias=bias)
        x = x + a
        if self.cross is not None:
            x = x + self.cross.step(self.norm_x(x), static=cross_static)[0]
        return x + self.mlp(self.norm2(x)), cache


def last_states(
    blocks: nn.ModuleList, x: torch.Tensor, layout: Layout, rows: torch.Tensor
) -> torch.Tensor:
    """Causal `blocks` over packed tokens `x`, returning `[B, d]` at packed positions `rows`
    (each row's last real token): the final block computes those tokens alone."""
    for block in blocks[:-1]:
        x = block(x, layout)[0]
    return blocks[-1].last(x, layout, rows)


def user_bucket(user: torch.Tensor, buckets: int) -> torch.Tensor:
    """Hash user ids into `buckets` (multiplicative hashing, so neighbouring ids spread out)."""
    return (user * 2654435761) % (2**32) % buckets


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
        item_tokens = self.item_codes + torch.tensor(offsets[:-1])
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
            self.drop = Dropout(dropout)
            args = (d_model, num_heads, head_dim, d_ff, dropout)
            kw = dict(t5=t5, mlp_layers=mlp_layers)
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
        return codes + torch.tensor(self.offsets[:-1], device=codes.device)

    def _level_logits(self, h: torch.Tensor, level: int) -> torch.Tensor:
        w = self.head.weight[self.offsets[level] : self.offsets[level + 1]]
        return F.linear(h, w)

    # --- full-sequence forward (training, and the uncached reference) ---------------------------

    def _encode(self, tokens, count):
        """Packed encoder states `[N, d]` and their layout."""
        ar = torch.arange(tokens.shape[1], device=tokens.device)
        keep = ar < count[:, None]
        keep[:, 0] = True  # an empty history still attends to something
        layout = Layout.of(keep)
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
        layout = Layout.of(keep, mask=mask[:, None])
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

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["target"]))
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.lr, weight_decay=self.weight_decay, foreach=True
        )
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
            keep = None if layout.mask is None else layout.mask[:, 0, 0]
            return {"cross": [(*b.cross.memory_kv(memory, layout), keep) for b in self.decoder]}
        bos = torch.full_like(tokens[:, :1], self.bos)
        h, kvs, keep, pos = self._run_decoder_only(tokens, count, bos)
        # the prompt ends with bos, so its last state already predicts level 0
        prefix = [(k, v, keep) for k, v in kvs]
        return {"prefix": prefix, "bos_pos": pos[:, -1], "h0": h[:, -1:, None]}

    def _decode(self, state: dict, tokens: torch.Tensor, start: int, caches: list | None):
        """States `[B, W, t, d]` for decoder tokens `[B, W, t]` at decoder steps start.. ."""
        caches = caches or [None] * len(self.decoder)
        t = tokens.shape[-1]
        # under autocast keep the beams' residual stream in bf16 too: it halves memory traffic
        dev = tokens.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        steps = torch.arange(start, start + t, device=tokens.device)
        x, bias = self.embed(tokens), None
        if self.architecture == "encoder_decoder":
            if self.t5:  # only the new queries' rows: keys are decoder steps 0 .. start+t-1
                keys = torch.arange(start + t, device=tokens.device)
                bias = (None, self.dec_rel(keys[None] - steps[:, None]))
            else:
                x = x + self.dec_pos.weight[start : start + t]
            x = x.to(dtype)
            for i, block in enumerate(self.decoder):
                x, caches[i] = block.step(
                    x, cache=caches[i], cross_static=state["cross"][i], bias=bias
                )
        else:
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
    def search(self, batch: dict[str, torch.Tensor], k: int) -> tuple[torch.Tensor, ...]:
        """Decoded SID groups `[B, W]` (-1: invalid or none) and their log-likelihoods."""
        with self._autocast():
            return self._search(batch, k)

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

    def _search(self, batch, k):
        state = self._start(batch)
        decoding, width = self._decoding()
        if decoding == "exhaustive":
            exhaustive = ExhaustiveSearch(self.unique_codes, chunk=256)
            return exhaustive.search(lambda codes: self._score_codes(state, codes), k)
        beams = ConstrainedBeamSearch(self.prefixes, width, decoding == "constrained")
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

    def _eval_start(self) -> None:
        super()._eval_start()
        self._invalid = self._decoded = 0

    def _eval_end(self, stage: str) -> None:
        super()._eval_end(stage)
        if self._decoding()[0] == "free":
            self.log(f"{stage}/invalid_rate", self._invalid / max(self._decoded, 1))
