"""TIGER: construction, variants, config, and a short training run against popularity."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from grid.data import SequenceDataModule, leave_one_out
from grid.errors import GridError
from grid.generators import GENERATORS, PipelineInputs
from grid.generators.layers import Dropout
from grid.generators.popularity import Popularity
from grid.generators.tiger import TIGER
from grid.sids import assign_sids
from grid.tokenizers.rkmeans import ResidualKMeans

SMALL = dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, encoder_layers=2, decoder_layers=2)


def subset(beauty, items: int):
    """Beauty restricted to its `items` most popular items (users keeping >= 3 interactions)."""
    counts = np.bincount(np.concatenate(beauty.sequences), minlength=beauty.num_items)
    keep = np.argsort(-counts, kind="stable")[:items]
    remap = np.full(beauty.num_items, -1)
    remap[keep] = np.arange(items)
    seqs = [remap[s][remap[s] >= 0] for s in beauty.sequences]
    return [s for s in seqs if len(s) >= 3]


def cooccurrence_sids(train: list[np.ndarray], items: int, codebook: int):
    """SIDs from item co-occurrence embeddings (SVD), so similar items share code prefixes."""
    C = np.zeros((items, items), dtype=np.float32)
    for s in train:
        u = np.unique(s)
        C[np.ix_(u, u)] += 1
    np.fill_diagonal(C, 0)
    U, S, _ = np.linalg.svd(np.log1p(C))
    emb = U[:, :32] * np.sqrt(S[:32]) + 1e-3 * np.random.default_rng(0).standard_normal((items, 32))
    tok = ResidualKMeans(3, codebook, niter=10)
    return assign_sids(tok.fit_encode(emb.astype(np.float32)), tok.vocab_sizes, "dedup")


def trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(beauty):
    seqs = subset(beauty, 150)
    split = leave_one_out(seqs, 20)
    sids = cooccurrence_sids(split.train, 150, 8)
    return sids, SequenceDataModule(split, batch_size=64, eval_batch_size=64)


def test_build_needs_sids_and_is_registered(small):
    sids, _ = small
    inputs = PipelineInputs(num_items=150, num_users=10, train_sequences=[], sids=None)
    with pytest.raises(GridError, match="semantic IDs"):
        TIGER.build(inputs)
    inputs.sids = sids
    assert isinstance(GENERATORS["tiger"].build(inputs, **SMALL), TIGER)
    with pytest.raises(GridError):
        TIGER(sids, decoding="greedy")


def test_beam_narrower_than_the_largest_k_is_refused(small):
    sids, dm = small
    message = (
        r"^generator.beam_width=10 is smaller than the largest K \(20\) .*set beam_width >= 20$"
    )
    with pytest.raises(GridError, match=message):
        TIGER(sids, beam_width=10, **SMALL)
    with pytest.raises(GridError, match=message):
        TIGER(sids, beam_width=10, decoding="free", **SMALL)
    TIGER(sids, beam_width=10, ks=(1, 5, 10), **SMALL)  # fine when no K exceeds the beam
    TIGER(sids, beam_width=10, decoding="exhaustive", **SMALL)  # no beam to be narrow
    # at the smallest allowed width every user gets max(K) real items to score
    model = TIGER(sids, beam_width=20, **SMALL).eval()
    assert (model.recommend(next(iter(dm.val_dataloader())), 20) >= 0).all()


def test_model_selection_ignores_inference_settings(small):
    sids, dm = small
    torch.manual_seed(0)
    model = TIGER(sids, decoding="free", beam_width=30, **SMALL)
    assert model.selection_decoding() == {"decoding": "constrained", "beam_width": 20}
    fit = trainer(max_steps=1, val_check_interval=1, limit_val_batches=8)
    fit.fit(model, dm.train_dataloader(), dm.val_dataloader())  # validates after the one step
    selected = {k: float(v) for k, v in fit.callback_metrics.items() if k.startswith("valid/")}
    assert "valid/ndcg@10" in selected and "valid/invalid_rate" not in selected
    assert not model.selecting  # outside fit's validation the configured decoding is back

    def validate(**settings):
        model.decoding, model.beam_width = settings["decoding"], settings["beam_width"]
        return trainer(limit_val_batches=8).validate(model, dm.val_dataloader(), verbose=False)[0]

    fixed = validate(**model.selection_decoding())
    assert selected == pytest.approx({k: fixed[k] for k in selected}, rel=1e-6)
    configured = validate(decoding="free", beam_width=30)
    assert "valid/invalid_rate" in configured
    assert any(configured[k] != fixed[k] for k in selected)


@pytest.mark.parametrize(
    "params",
    [
        {"user_tokens": 13},
        {"architecture": "decoder_only"},
        {"architecture": "decoder_only", "user_tokens": 5},
    ],
)
def test_variants_train_and_recommend(small, params):
    sids, dm = small
    model = TIGER(sids, **SMALL, **params)
    batch = next(iter(dm.train_dataloader()))
    loss = model.loss(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert model.embed.weight.grad.abs().sum() > 0
    if params.get("user_tokens"):  # the user rows of the embedding learn
        users = model.embed.weight.grad[model.offsets[-1] : model.pad]
        assert users.abs().sum() > 0
    model.eval()
    items = model.recommend(next(iter(dm.val_dataloader())), 10)
    assert items.shape == (64, 10)
    assert ((items >= 0) & (items < 150)).all()


def test_history_longer_than_max_history_keeps_the_latest(small):
    sids, _ = small
    model = TIGER(sids, max_history=2, **SMALL)
    batch = {
        "user": torch.tensor([0, 1]),
        "history": torch.tensor([[5, 6, 7, 8], [9, -1, -1, -1]]),
        "length": torch.tensor([4, 1]),
    }
    tokens, count = model._prompt(batch)
    assert count.tolist() == [2 * sids.length, sids.length]
    expect = model.item_tokens[torch.tensor([7, 8])].flatten()
    assert torch.equal(tokens[0], expect)
    assert (tokens[1, sids.length :] == model.pad).all()


def test_free_decoding_logs_invalid_rate(small):
    sids, dm = small
    model = TIGER(sids, decoding="free", **SMALL)
    out = trainer(limit_val_batches=2).validate(model, dm.val_dataloader(), verbose=False)[0]
    assert 0.0 <= out["valid/invalid_rate"] <= 1.0
    assert out["valid/invalid_rate"] > 0  # untrained: most beams leave the valid SIDs


@pytest.mark.slow
def test_short_training_beats_popularity(beauty):
    items = 500
    split = leave_one_out(subset(beauty, items), 20)
    sids = cooccurrence_sids(split.train, items, 16)
    dm = SequenceDataModule(split, batch_size=128, eval_batch_size=256, val_users=1000)
    torch.manual_seed(0)
    model = TIGER(sids, lr=2e-3, **SMALL)
    trainer(max_steps=150, limit_val_batches=0).fit(model, dm.train_dataloader())
    ours = trainer().validate(model, dm.val_dataloader(), verbose=False)[0]
    pop = Popularity(items, split.train)
    base = trainer().validate(pop, dm.val_dataloader(), verbose=False)[0]
    assert ours["valid/recall@10"] > base["valid/recall@10"]


def test_dropout_keeps_one_minus_p_preserves_the_mean_and_follows_the_torch_seed():
    drop = Dropout(0.15).train()
    x = torch.ones(1000, 1000)
    torch.manual_seed(3)
    a = drop(x)
    kept = a != 0
    assert abs(kept.float().mean().item() - 0.85) < 3e-3
    assert abs(a.mean().item() - 1.0) < 5e-3
    assert torch.allclose(a[kept], torch.full_like(a[kept], 1 / (1 - 0.15)), rtol=1e-4)
    torch.manual_seed(3)
    assert torch.equal(drop(x), a)  # the torch seed fixes the mask
    assert not torch.equal(drop(x), a)  # and each call draws a new one
    assert torch.equal(drop.eval()(x), x)
