"""Transformer layers shared by the generators: attention, norms, MLP, the packed-token Layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

T5_BUCKETS, T5_MAX_DISTANCE = 32, 128  # HF T5Config defaults, which GRID keeps
FLASH_MIN_KEYS = 40  # bf16 CPU inference: fused attention from this many keys on (see `attend`)


def cached_attention(q, static=None, dynamic=None, bias=None, scale=None):
    """Attention of beam queries over per-user keys shared by all beams and per-beam keys.

    q `[B, W, t, h, dk]` (beams x new tokens); static `(k, v, pad)`: k, v `[B, h, T, dk]`,
    pad `[B, 1, 1, T]` bool (True: a padding key) or None; dynamic `(k, v)` `[B*W, h, S, dk]`,
    the last t positions the queries' own. bias `(static [1, h, t, T] | None, dynamic [h, t, S]
    | None)` is added to the scores (T5 relative positions); scale defaults to dk**-0.5. Shared
    keys are never copied per beam: beams fold into the query length. Returns `[B, W, t, h*dk]`.
    """
    B, W, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    static_bias, dynamic_bias = (None, None) if bias is None else bias
    T = 0
    parts = []
    if static is not None:
        k, v, pad = static
        T = k.shape[2]
        s = q.view(B, W * t, h, dk).transpose(1, 2) @ k.transpose(-1, -2)  # [B, h, W*t, T]
        if scale != 1:
            s = s * scale
        if pad is not None:
            s = s.masked_fill(pad, float("-inf"))
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
    p = (torch.cat(parts, dim=-1) if len(parts) > 1 else s).softmax(-1)
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

    Linear layers run on the packed tokens only; attention runs on the padded grid. Unpacked
    layouts (`packed=False`) run every grid position: shapes that do not depend on the data and
    no host syncs, for GPUs and compiled graphs.
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
    def of(
        cls,
        keep: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        packed: bool = True,
    ):
        """The layout of real tokens `keep` `[B, T]`. Without a `mask`, bidirectional layouts
        hide the padded keys; causal ones must be right-padded, so that no real query sees the
        padding and none is needed."""
        B, T = keep.shape
        if not packed:
            if mask is None and not causal:
                mask = keep[:, None, None, :]
            return cls(B, T, None, mask, causal, keep)
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

    def last_rows(self, count: torch.Tensor) -> torch.Tensor:
        """Rows `[B]` of each grid row's last real token, for right-padded rows of `count` real
        tokens: packed rows hold the real tokens first, in grid order."""
        if self.index is None:
            return torch.arange(self.B, device=count.device) * self.T + count - 1
        return count.cumsum(0) - 1


def attend(q, k, v, mask=None, causal=False, scale=None, bias=None, dropout=None, fused=False):
    """Attention `[B, h, Tq, dk]`; mask is bool (True: may attend), bias an additive
    `[1, h, Tq, Tk]` (T5 relative positions) broadcast over the batch. `dropout`: a module
    applied to the attention probabilities (GPT-2's attn_pdrop) while it trains. `fused`: always
    `F.scaled_dot_product_attention` (the fixed-shape path: one kernel each way on every device)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    # CPU flash attention is slow in bf16 at our short lengths, above all its backward; without
    # gradients it overtakes the plain product from about 40 keys on (bias kept in fp32 below)
    flash = not torch.is_grad_enabled() and bias is None and Tk >= FLASH_MIN_KEYS
    dropping = dropout is not None and dropout.training and dropout.p > 0
    if fused or not dropping and (q.dtype != torch.bfloat16 or q.device.type != "cpu" or flash):
        if bias is not None:  # SDPA takes one mask: the bias, -inf where attention is barred
            if causal:
                future = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(1)
                bias = bias.masked_fill(future, float("-inf"))
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            mask, causal = mask.to(q.dtype), False
        return F.scaled_dot_product_attention(
            q, k, v, mask, dropout.p if dropping else 0.0, causal, scale=scale
        )
    s = (q * (q.shape[-1] ** -0.5 if scale is None else scale)) @ k.transpose(-1, -2)
    if bias is not None:
        s = s.float() + bias
    if causal:
        future = torch.ones(Tq, Tk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.float().softmax(-1).to(v.dtype)
    return (dropout(p) if dropping else p) @ v


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask costs a fraction of torch's Bernoulli sampler (which, at our
    shapes, took a fifth of a TIGER training step): 16-bit uniform draws from numpy's PCG64,
    seeded from torch's generator (so `torch.manual_seed` and saved RNG states still fix every
    mask), kept with probability 1 - p to within 2**-16 and rescaled exactly.

    `numpy_masks=False` (the fixed-shape path) is torch's dropout: the seed is a host read, and
    numpy cannot be traced into a compiled graph.
    """

    def __init__(self, p: float = 0.5, numpy_masks: bool = True):
        super().__init__(p)
        self.numpy_masks = numpy_masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p > 0):
            return x
        if not self.numpy_masks:  # one kernel each way on every device
            return torch.native_dropout(x, self.p, True)[0]
        if x.device.type != "cpu":
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
        # one fused kernel on GPUs; on CPUs the same operators as written out, bit for bit
        return F.rms_norm(x.float(), self.weight.shape, self.weight, self.eps).to(dtype)


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


ACTIVATIONS = {
    "relu": partial(nn.ReLU, inplace=True),
    "gelu_new": partial(nn.GELU, approximate="tanh"),  # HF GPT-2's gelu_new: the tanh form
}


def feed_forward(
    d_model: int,
    d_ff: int,
    layers: int,
    dropout: float,
    t5: bool,
    packed: bool = True,
    activation: str = "relu",
    bias: bool = False,
) -> nn.Sequential:
    """The block MLP. One hidden layer: d -> d_ff -> d with ReLU and no biases (T5's
    DenseReluDense, with its inner dropout when t5), or GPT-2's MLP with `activation="gelu_new"`
    and `bias`. More: GRID's T5MultiLayerFF (`mlp_layers`), `layers` hidden ReLU layers of d_ff,
    with biases and a dropout after each later linear. `packed`: numpy dropout masks on CPUs
    (see `Dropout`)."""
    if layers == 1:
        inner = [Dropout(dropout, packed)] if t5 else []
        return nn.Sequential(
            nn.Linear(d_model, d_ff, bias=bias),
            ACTIVATIONS[activation](),
            *inner,
            nn.Linear(d_ff, d_model, bias=bias),
        )
    dims = [d_ff] * layers + [d_model]
    mods = [nn.Linear(d_model, d_ff)]
    for i in range(1, len(dims)):
        mods += [nn.ReLU(inplace=True), nn.Linear(dims[i - 1], dims[i]), Dropout(dropout, packed)]
    return nn.Sequential(*mods)


class Attention(nn.Module):
    """Multi-head attention with T5-style head size (inner dim = heads x head_dim).

    `scale` multiplies the scores: None is dk**-0.5; T5 uses 1 (its init absorbs the scaling).
    `bias`: biases on the projections (GPT-2); `dropout`: on the attention probabilities while
    training (GPT-2's attn_pdrop), with numpy masks on CPUs when `packed` (see `Dropout`).
    """

    def __init__(
        self,
        d_model: int,
        heads: int,
        head_dim: int,
        cross: bool,
        scale=None,
        bias: bool = False,
        dropout: float = 0.0,
        packed: bool = True,
    ):
        super().__init__()
        self.heads, self.head_dim, self.cross, self.scale = heads, head_dim, cross, scale
        inner = heads * head_dim
        if cross:
            self.q = nn.Linear(d_model, inner, bias=bias)
            self.kv = nn.Linear(d_model, 2 * inner, bias=bias)
        else:
            self.qkv = nn.Linear(d_model, 3 * inner, bias=bias)
        self.out = nn.Linear(inner, d_model, bias=bias)
        self.drop = Dropout(dropout, packed) if dropout > 0 else None
        self.fused = not packed  # the fixed-shape path attends as a GPU does (see `attend`)

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
            y = attend(q, k, v, memory_mask, scale=self.scale, dropout=self.drop, fused=self.fused)
        else:
            q, k, v = self._heads(layout.pad(self.qkv(x)), 3)
            y = attend(q, k, v, layout.mask, layout.causal, self.scale, bias, self.drop, self.fused)
        return self.out(layout.pack(y.transpose(1, 2))), k, v

    def last(self, x: torch.Tensor, layout: Layout, rows: torch.Tensor) -> torch.Tensor:
        """Self-attention output `[B, d]` of the last real token of each row of a causal,
        right-padded layout (packed positions `rows`); the other tokens serve as keys only."""
        B, h, dk = layout.B, self.heads, self.head_dim
        w, b = self.qkv.weight, self.qkv.bias  # rows: q, then k and v
        q = F.linear(x[rows], w[: h * dk], None if b is None else b[: h * dk]).view(B, h, 1, dk)
        kv = F.linear(x, w[h * dk :], None if b is None else b[h * dk :])
        k, v = self._heads(layout.pad(kv), 2)
        # the row's last token sees every real token of its row, never the padding
        keep = None if layout.keep is None else layout.keep[:, None, None, :]
        y = attend(q, k, v, mask=keep, scale=self.scale, dropout=self.drop, fused=self.fused)
        return self.out(y.reshape(B, h * dk))

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

    t5: RMS norms and unscaled attention scores (HF T5); else LayerNorm (eps `norm_eps`) and
    dk**-0.5. The GPT-2 options, off by default: `activation="gelu_new"`, `bias` (on every
    linear layer and LayerNorm), `attn_dropout` on the attention probabilities.
    packed: numpy dropout masks on CPUs; False for the fixed-shape path (see `Dropout`).
    """

    def __init__(
        self,
        d_model,
        heads,
        head_dim,
        d_ff,
        dropout,
        cross,
        t5=False,
        mlp_layers=1,
        packed=True,
        attn_dropout: float = 0.0,
        activation: str = "relu",
        bias: bool = False,
        norm_eps: float = 1e-5,
    ):
        super().__init__()
        norm = RMSNorm if t5 else partial(nn.LayerNorm, eps=norm_eps, bias=bias)
        attention = partial(
            Attention,
            d_model,
            heads,
            head_dim,
            scale=1.0 if t5 else None,
            bias=bias,
            dropout=attn_dropout,
            packed=packed,
        )
        self.norm1 = norm(d_model)
        self.attn = attention(cross=False)
        if cross:
            self.norm_x = norm(d_model)
            self.cross = attention(cross=True)
        else:
            self.cross = None
        self.norm2 = norm(d_model)
        self.mlp = feed_forward(d_model, d_ff, mlp_layers, dropout, t5, packed, activation, bias)
        self.drop = Dropout(dropout, packed)

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
