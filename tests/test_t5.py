"""The T5 TIGER against HuggingFace T5: logits, constrained beam search, and its KV cache.

Histories mix lengths 1..20 (real Beauty training prefixes), so padding, key masks and the
decoder-only right-alignment are all exercised.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Stack

from grid.data import SequenceSamples, training_samples
from grid.generators.tiger import TIGER
from grid.sids import assign_sids
from grid.tokenizers.rkmeans import ResidualKMeans

SMALL = dict(
    d_model=32,
    num_heads=2,
    head_dim=16,
    d_ff=64,
    encoder_layers=2,
    decoder_layers=2,
    dropout=0.0,
    t5=True,
    bf16=False,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sids(beauty_embeddings):
    """Every Beauty item's SID: RK-Means 3x16 on its MiniLM embedding, plus the de-dup digit."""
    tok = ResidualKMeans(3, 16, niter=5)
    return assign_sids(tok.fit_encode(beauty_embeddings), tok.vocab_sizes, "dedup")


@pytest.fixture(scope="module")
def batch(beauty_split):
    """One training prefix of each length 1..20, in shuffled order (right-padded to 20)."""
    samples = SequenceSamples(*training_samples(beauty_split.train, 20))
    rows = [int(np.flatnonzero(samples.lengths.numpy() == n)[0]) for n in range(1, 21)]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(20)]
    out = samples.collate(rows)
    assert sorted(out["length"].tolist()) == list(range(1, 21))
    return out


def hf_config(model: TIGER, **kw) -> T5Config:
    return T5Config(
        vocab_size=model.embed.num_embeddings,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_heads=2,
        num_layers=2,
        num_decoder_layers=2,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        tie_word_embeddings=False,  # no d_model**-0.5 rescale of the decoder output (as in GRID)
        decoder_start_token_id=model.bos,
        pad_token_id=model.pad,
        eos_token_id=model.pad,
        **kw,
    )


def grid_mlp(hf: nn.Module, layers: int) -> None:
    """Swap each T5 MLP for GRID's T5MultiLayerFF MLP (`layers` biased hidden layers), as GRID
    does when `mlp_layers` is set; T5LayerFF keeps its norm, residual and dropout."""
    if layers == 1:
        return
    for module in list(hf.modules()):
        if hasattr(module, "DenseReluDense"):
            dims = [32] + [64] * layers + [32]
            mods = [nn.Linear(dims[0], dims[1])]
            for i in range(2, len(dims)):
                mods += [nn.ReLU(), nn.Linear(dims[i - 1], dims[i])]
            module.DenseReluDense = nn.Sequential(*mods)


def randomise(hf: nn.Module) -> None:
    """Non-trivial norm weights (HF initialises them to 1, which would hide a swapped norm)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "layer_norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


def load_block(ours, layers) -> None:
    """Copy one HF T5Block (its `layer` list) into our Block."""
    sa = layers[0].SelfAttention
    ours.norm1.weight.copy_(layers[0].layer_norm.weight)
    ours.attn.qkv.weight.copy_(torch.cat([sa.q.weight, sa.k.weight, sa.v.weight]))
    ours.attn.out.weight.copy_(sa.o.weight)
    if ours.cross is not None:
        ca = layers[1].EncDecAttention
        ours.norm_x.weight.copy_(layers[1].layer_norm.weight)
        ours.cross.q.weight.copy_(ca.q.weight)
        ours.cross.kv.weight.copy_(torch.cat([ca.k.weight, ca.v.weight]))
        ours.cross.out.weight.copy_(ca.o.weight)
    ours.norm2.weight.copy_(layers[-1].layer_norm.weight)
    theirs = [m for m in layers[-1].DenseReluDense.modules() if isinstance(m, nn.Linear)]
    mine = [m for m in ours.mlp if isinstance(m, nn.Linear)]
    for a, b in zip(mine, theirs, strict=True):
        a.weight.copy_(b.weight)
        if a.bias is not None:
            a.bias.copy_(b.bias)


@torch.no_grad()
def load_t5(model: TIGER, hf: T5ForConditionalGeneration) -> None:
    """Weights of a T5ForConditionalGeneration into an encoder-decoder T5 TIGER.

    HF keeps each stack's relative bias in its first layer's self-attention; ours sits beside the
    stack. Our fused qkv / kv projections are HF's q, k, v stacked; our head is the rows of
    lm_head that are SID tokens.
    """
    model.embed.weight.copy_(hf.shared.weight)
    model.head.weight.copy_(hf.lm_head.weight[: model.offsets[-1]])
    for ours, stack in ((model.enc_rel, hf.encoder), (model.dec_rel, hf.decoder)):
        ours.embed.weight.copy_(
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        )
    model.enc_norm.weight.copy_(hf.encoder.final_layer_norm.weight)
    model.dec_norm.weight.copy_(hf.decoder.final_layer_norm.weight)
    for ours, theirs in zip(model.encoder, hf.encoder.block, strict=True):
        load_block(ours, theirs.layer)
    for ours, theirs in zip(model.decoder, hf.decoder.block, strict=True):
        load_block(ours, theirs.layer)


def t5_pair(sids, mlp_layers=1, **params):
    """A random HF T5ForConditionalGeneration (dropout 0, our vocabulary) and our copy of it."""
    model = TIGER(sids, **SMALL, mlp_layers=mlp_layers, **params).eval()
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(hf_config(model))
    grid_mlp(hf, mlp_layers)
    hf.lm_head.weight = nn.Parameter(torch.randn_like(hf.lm_head.weight))  # untied from `shared`
    randomise(hf)
    hf.eval()
    load_t5(model, hf)
    return model, hf


def encoder_inputs(model: TIGER, batch) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, count = model._prompt(batch)
    keep = torch.arange(tokens.shape[1]) < count[:, None]
    assert not keep.all()  # the batch really has padding
    return tokens, keep.long()


@pytest.mark.parametrize(
    "params",
    [
        {"mlp_layers": 1},  # HF T5 as it comes
        {"mlp_layers": 2, "item_separator": True, "user_tokens": 7},  # GRID's MLP and separators
    ],
)
def test_logits_match_hf_t5(sids, batch, params):
    model, hf = t5_pair(sids, **params)
    codes = model.item_codes[batch["target"]]
    with torch.no_grad():
        h = model(batch, codes)
        tokens, keep = encoder_inputs(model, batch)
        bos = torch.full((len(codes), 1), model.bos)
        dec_in = torch.cat([bos, model._sid_tokens(codes)[:, :-1]], dim=1)
        logits = hf(input_ids=tokens, attention_mask=keep, decoder_input_ids=dec_in).logits
    for level in range(model.levels):
        lo, hi = model.offsets[level], model.offsets[level + 1]
        ours = model._level_logits(h[:, level], level)
        torch.testing.assert_close(ours, logits[:, level, lo:hi], rtol=0, atol=1e-4)


def test_decoder_only_matches_hf_t5_stack_without_padding(sids, batch):
    """Our right-aligned, padded decoder-only batch equals HF's T5 decoder run on each user
    alone (no padding at all): relative positions must ignore the left padding."""
    model = TIGER(sids, **SMALL, mlp_layers=1, architecture="decoder_only", user_tokens=7).eval()
    torch.manual_seed(0)
    stack = T5Stack(hf_config(model, is_decoder=True, is_encoder_decoder=False))
    randomise(stack)
    stack.eval()
    with torch.no_grad():
        model.embed.weight.copy_(stack.embed_tokens.weight)
        model.dec_rel.embed.weight.copy_(
            stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        )
        model.dec_norm.weight.copy_(stack.final_layer_norm.weight)
        for ours, theirs in zip(model.decoder, stack.block, strict=True):
            load_block(ours, theirs.layer)
        codes = model.item_codes[batch["target"]]
        h = model(batch, codes)  # [B, L, d]: states predicting each level
        tokens, count = model._prompt(batch)
        for b in range(len(codes)):
            seq = torch.cat([tokens[b, : count[b]], torch.tensor([model.bos])])
            seq = torch.cat([seq, model._sid_tokens(codes[b : b + 1])[0, :-1]])
            ref = stack(input_ids=seq[None], use_cache=False).last_hidden_state[0, -model.levels :]
            torch.testing.assert_close(h[b], ref, rtol=0, atol=1e-5)


def level_of(model: TIGER, token: torch.Tensor) -> torch.Tensor:
    """The SID level of the next token, from the previous decoder token (bos: level 0)."""
    offsets = torch.tensor(model.offsets[:-1])
    prev = torch.searchsorted(offsets, token, right=True) - 1
    return torch.where(token == model.bos, 0, prev + 1)


def test_constrained_beam_search_equals_hf_generate(sids, batch):
    """Ours vs HF `generate(num_beams=W)` with the same prefix constraint.

    HF log-softmaxes over its whole vocabulary before any LogitsProcessor runs (and the prefix
    constraint runs before custom processors), while we normalise within each SID level's
    vocabulary. A forward hook therefore sets every logit outside the level being generated to
    -inf, so that HF's full-vocabulary log-softmax is exactly our within-level one.
    """
    model, hf = t5_pair(sids, mlp_layers=2)
    W, L = 5, model.levels
    model.beam_width = W
    users = torch.tensor([0, 3, 7, 12, 17])
    few = {k: v[users] for k, v in batch.items()}
    groups, scores = model.search(few, W)
    assert (scores > float("-inf")).all()

    offsets = torch.tensor(model.offsets)

    def restrict(module, args, kwargs, output):
        level = level_of(model, kwargs["decoder_input_ids"][:, -1])
        vocab = torch.arange(output.logits.shape[-1])
        inside = (vocab >= offsets[level, None]) & (vocab < offsets[level + 1, None])
        output.logits.masked_fill_(~inside[:, None, :], float("-inf"))
        return output

    following = {}  # each valid prefix -> the codes that may follow it, from the SIDs alone
    for sid in model.sids.unique_codes.tolist():
        for level in range(L):
            following.setdefault(tuple(sid[:level]), set()).add(sid[level])

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        level = len(sent) - 1
        prefix = tuple(t - model.offsets[i] for i, t in enumerate(sent[1:].tolist()))
        return sorted(c + model.offsets[level] for c in following.get(prefix, ()))

    hook = hf.register_forward_hook(restrict, with_kwargs=True)
    tokens, keep = encoder_inputs(model, few)
    config = GenerationConfig(
        num_beams=W,
        num_return_sequences=W,
        max_new_tokens=L,
        do_sample=False,
        length_penalty=0.0,  # sequences_scores = summed log-probabilities
        early_stopping=False,
        decoder_start_token_id=model.bos,
        pad_token_id=model.pad,
        eos_token_id=model.pad,  # never allowed, so every beam runs L steps
    )
    with torch.no_grad():
        out = hf.generate(
            input_ids=tokens,
            attention_mask=keep,
            generation_config=config,
            prefix_allowed_tokens_fn=allowed,
            return_dict_in_generate=True,
            output_scores=True,
        )
    hook.remove()
    hf_codes = (out.sequences[:, 1:] - offsets[:-1]).view(len(users), W, L)
    ours = torch.as_tensor(sids.unique_codes)[groups]
    assert torch.equal(ours, hf_codes)
    torch.testing.assert_close(scores, out.sequences_scores.view(len(users), W), atol=1e-4, rtol=0)


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
@pytest.mark.parametrize("decoding", ["constrained", "exhaustive"])
def test_kv_cached_decoding_equals_recomputation(sids, batch, architecture, decoding):
    """Beam steps decode one token per step, exhaustive scoring all levels at once (t > 1)."""
    params = dict(SMALL, architecture=architecture, decoding=decoding, user_tokens=7)
    model = TIGER(sids, **params, beam_width=20, item_separator=True).eval()
    if decoding == "exhaustive":  # scores every SID: a few users of lengths 1, 20 and between
        few = (batch["length"] <= 3) | (batch["length"] >= 19)
        batch = {k: v[few] for k, v in batch.items()}
    groups, scores = model.search(batch, 10)
    assert (scores > float("-inf")).all()
    codes = torch.as_tensor(sids.unique_codes)[groups]
    torch.testing.assert_close(model.uncached_logprob(batch, codes), scores, rtol=0, atol=1e-4)
    if decoding == "exhaustive":
        return
    model.bf16 = True  # the cached bf16 path stays close to the fp32 recomputation
    groups, scores = model.search(batch, 10)
    codes = torch.as_tensor(sids.unique_codes)[groups]
    model.bf16 = False
    torch.testing.assert_close(model.uncached_logprob(batch, codes), scores, rtol=0, atol=0.05)
