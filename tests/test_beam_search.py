"""Prefix tables, constrained/free beam search and the exhaustive oracle on a small Beauty slice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from grid.data import SequenceDataModule, leave_one_out
from grid.generators.beam_search import ConstrainedBeamSearch, PrefixTable
from grid.generators.tiger import TIGER
from grid.sids import assign_sids
from grid.tokenizers.rkmeans import ResidualKMeans

SMALL = dict(
    d_model=32, num_heads=2, head_dim=16, d_ff=64, encoder_layers=2, decoder_layers=2, bf16=False
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(beauty):
    """The 150 most popular Beauty items (RK-Means 3x8 + dedup) and histories over them."""
    counts = np.bincount(np.concatenate(beauty.sequences), minlength=beauty.num_items)
    keep = np.argsort(-counts, kind="stable")[:150]
    remap = np.full(beauty.num_items, -1)
    remap[keep] = np.arange(len(keep))
    seqs = [remap[s][remap[s] >= 0] for s in beauty.sequences]
    seqs = [s for s in seqs if len(s) >= 3]
    emb = np.random.default_rng(0).standard_normal((len(keep), 32)).astype(np.float32)
    tok = ResidualKMeans(3, 8, niter=5)
    sids = assign_sids(tok.fit_encode(emb), tok.vocab_sizes, "dedup")
    dm = SequenceDataModule(leave_one_out(seqs, 20), batch_size=64, eval_batch_size=32)
    return sids, dm


def _batch(dm):
    return next(iter(dm.val_dataloader()))


def test_prefix_table_lookup_and_next(small):
    sids, _ = small
    table = PrefixTable(sids.unique_codes, sids.vocab_sizes)
    codes = torch.as_tensor(sids.unique_codes)
    assert torch.equal(table.lookup(codes), torch.arange(len(codes)))
    bad = codes.clone()
    bad[:, -1] = sids.vocab_sizes[-1] - 1  # the largest dedup digit: only one group has it
    valid = {tuple(c) for c in sids.unique_codes.tolist()}
    expect = torch.tensor([tuple(c) in valid for c in bad.tolist()])
    assert torch.equal(table.lookup(bad) >= 0, expect)
    # level-0 extensions of the root are exactly the first codes in use
    used = np.unique(sids.unique_codes[:, 0])
    root = table.next(0, torch.zeros(1, dtype=torch.long))[0]
    assert torch.equal((root >= 0).nonzero()[:, 0], torch.as_tensor(used))
    assert (table.next(1, torch.tensor([-1])) == -1).all()


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_wide_constrained_beam_equals_exhaustive(small, architecture):
    sids, dm = small
    model = TIGER(sids, architecture=architecture, beam_width=sids.num_unique, **SMALL).eval()
    batch = _batch(dm)
    groups, scores = model.search(batch, 20)
    model.decoding = "exhaustive"
    best, best_scores = model.search(batch, 20)
    torch.testing.assert_close(scores[:, :20], best_scores, rtol=0, atol=1e-4)
    same = groups[:, :20] == best
    gap = (best_scores[:, 1:] - best_scores[:, :-1]).abs()
    tied = torch.zeros_like(same)
    tied[:, 1:] |= gap < 1e-4
    tied[:, :-1] |= gap < 1e-4
    assert (same | tied).all()
    model.decoding = "constrained"
    items = model.recommend(batch, 10)
    assert ((items >= 0) & (items < sids.num_items)).all()


@pytest.mark.parametrize("architecture", ["encoder_decoder", "decoder_only"])
def test_kv_cache_matches_recomputation(small, architecture):
    sids, dm = small
    model = TIGER(sids, architecture=architecture, user_tokens=7, **SMALL).eval()
    batch = _batch(dm)
    groups, scores = model.search(batch, 20)
    codes = torch.as_tensor(sids.unique_codes)[groups]
    torch.testing.assert_close(model.uncached_logprob(batch, codes), scores, rtol=0, atol=1e-4)


def test_bf16_decoding_close_to_fp32(small):
    sids, dm = small
    model = TIGER(sids, **{**SMALL, "bf16": True}).eval()
    batch = _batch(dm)
    groups, scores = model.search(batch, 20)
    codes = torch.as_tensor(sids.unique_codes)[groups]
    torch.testing.assert_close(model.uncached_logprob(batch, codes), scores, rtol=0, atol=0.05)


def test_free_search_keeps_invalid_paths_constrained_does_not():
    # SIDs (0,0) and (1,1); the model prefers code 0 then code 1, which is no SID
    table = PrefixTable(np.array([[0, 0], [1, 1]]), (2, 2))
    prefs = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))

    def step(level, tokens, parents):
        width = 1 if tokens is None else tokens.shape[1]
        return prefs[level].expand(1, width, 2)

    groups, scores = ConstrainedBeamSearch(table, 4, constrained=False).search(step, 1)
    assert groups.tolist() == [[-1, 0, 1, -1]]
    torch.testing.assert_close(scores[0, 0], prefs[0, 0] + prefs[1, 1])
    groups, scores = ConstrainedBeamSearch(table, 4, constrained=True).search(step, 1)
    assert groups.tolist() == [[0, 1, -1, -1]]
    assert torch.isinf(scores[0, 2:]).all()


def test_free_decoding_drops_and_counts_invalid(small):
    sids, dm = small
    model = TIGER(sids, decoding="free", beam_width=30, **SMALL).eval()
    model._eval_start()
    batch = _batch(dm)
    groups, scores = model.search(batch, 10)
    invalid = int((groups < 0).sum())
    assert invalid > 0  # an untrained model wanders off the valid SIDs
    items = model.recommend(batch, 10)
    assert model._invalid == invalid and model._decoded == groups.numel()
    valid = (groups >= 0).sum(1).clamp(max=10)
    for row, n in zip(items, valid.tolist(), strict=True):
        assert (row[:n] >= 0).all() and (row[n:] == -1).all()
