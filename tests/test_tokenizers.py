"""Tokenizers on the real Beauty MiniLM embeddings: reference agreement, training, SIDs, errors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from grid.errors import GridError
from grid.pipeline import build_tokenizer
from grid.sids import assign_sids
from grid.tokenizers import (
    RQVAE,
    TOKENIZERS,
    MQTokenizer,
    OptimizedPQ,
    ResidualKMeans,
    ResidualVQ,
    Tokenizer,
)
from grid.tokenizers.base import single_threaded


def _usage(codes: np.ndarray, size: int) -> list[float]:
    return [len(np.unique(codes[:, j])) / size for j in range(codes.shape[1])]


@pytest.fixture(scope="module")
def X(beauty_embeddings: np.ndarray) -> np.ndarray:
    return beauty_embeddings


@pytest.fixture(scope="module")
def rkmeans(X) -> ResidualKMeans:
    return ResidualKMeans(levels=3, codebook_size=256, niter=10).fit(X)


@pytest.fixture(scope="module")
def rvq(X) -> ResidualVQ:
    return ResidualVQ(levels=3, codebook_size=256, epochs=5).fit(X)


@pytest.fixture(scope="module")
def rqvae(X) -> RQVAE:
    return RQVAE(levels=3, codebook_size=256, epochs=8).fit(X)


@pytest.fixture(scope="module")
def mq(X) -> MQTokenizer:
    return MQTokenizer(levels=3, codebook_size=256, epochs=8).fit(X)


@pytest.fixture(scope="module")
def opq(X) -> OptimizedPQ:
    return OptimizedPQ(subspaces=16, opq_iters=3).fit(X)


# --- agreement with the reference libraries ---------------------------------------------------


def test_rkmeans_level1_matches_faiss_kmeans(X):
    ours = ResidualKMeans(levels=1, codebook_size=64, niter=10, seed=3).fit(X).encode(X)
    km = faiss.Kmeans(X.shape[1], 64, niter=10, seed=3, max_points_per_centroid=256)
    km.train(X)
    ref = km.index.search(X, 1)[1][:, 0]
    np.testing.assert_array_equal(ours[:, 0], ref)


@pytest.mark.slow
def test_rkmeans_inertia_close_to_sklearn(X):
    from sklearn.cluster import KMeans

    tok = ResidualKMeans(levels=1, codebook_size=64, niter=20).fit(X)
    ours = ((X - tok.reconstruct(tok.encode(X))) ** 2).sum()
    ref = KMeans(64, n_init=1, max_iter=20, random_state=0).fit(X).inertia_
    assert abs(ours - ref) / ref < 0.03


def test_opq_matches_faiss_pipeline(X, opq):
    index = faiss.IndexPreTransform(
        faiss.OPQMatrix(X.shape[1], 16), faiss.IndexPQ(X.shape[1], 16, 8)
    )
    faiss.downcast_VectorTransform(index.chain.at(0)).niter = 3
    faiss.downcast_index(index.index).pq.cp.seed = 0
    with single_threaded():
        index.train(X)
    np.testing.assert_array_equal(opq.encode(X), index.sa_encode(X).astype(np.int64))
    assert opq.encode(X).shape == (len(X), 16) and not OptimizedPQ.ordered


def test_opq_reconstruction_and_options(X, opq):
    err = np.linalg.norm(X - opq.reconstruct(opq.encode(X))) / np.linalg.norm(X)
    assert err < 0.7
    small = X[:3000]
    white = OptimizedPQ(subspaces=8, opq_iters=1, pca_dim=64, whiten=True).fit(small)
    err_white = np.linalg.norm(small - white.reconstruct(white.encode(small)))
    assert err_white / np.linalg.norm(small) < 1.0
    mask = np.zeros(len(small), dtype=bool)
    mask[:1000] = True
    masked = OptimizedPQ(subspaces=8, opq_iters=1).fit(small, sample_mask=mask)
    assert masked.encode(small).shape == (len(small), 8)


def test_rkmeans_exact_when_every_item_has_a_centroid(X):
    small = X[:200]
    tok = ResidualKMeans(levels=2, codebook_size=200, niter=5).fit(small)
    codes = tok.encode(small)
    np.testing.assert_allclose(tok.reconstruct(codes), small, atol=1e-5)
    sids = assign_sids(codes, tok.vocab_sizes, "dedup")
    assert sids.num_unique == len(small)


# --- learned tokenizers ------------------------------------------------------------------------


@pytest.mark.slow
def test_rvq_trains_and_uses_its_codes(X, rvq):
    for history in rvq.loss_history_:
        assert history[-1] < history[0]
    codes = rvq.encode(X)
    assert min(_usage(codes, 256)) >= 0.5
    np.testing.assert_array_equal(codes, rvq.encode(X))


@pytest.mark.slow
def test_rqvae_trains_without_collapse(X, rqvae):
    assert rqvae.recon_history_[-1] < rqvae.recon_history_[0]
    codes = rqvae.encode(X)
    assert min(_usage(codes, 256)) >= 0.5
    np.testing.assert_array_equal(codes, rqvae.encode(X))


@pytest.mark.slow
def test_mq_trains_its_encoders(X, mq):
    assert mq.recon_history_[-1] < mq.recon_history_[0]
    codes = mq.encode(X)
    assert codes.shape == (len(X), 3) and min(_usage(codes, 256)) >= 0.5
    np.testing.assert_array_equal(codes, mq.encode(X))
    untrained = MQTokenizer(levels=3, codebook_size=256, epochs=0).fit(X)
    for before, after in zip(untrained.encoders_, mq.encoders_, strict=True):
        assert not torch.allclose(before[0].weight, after[0].weight)


def test_rvq_is_seeded(X):
    small = X[:2000]
    a = ResidualVQ(levels=2, codebook_size=32, epochs=2, seed=1).fit(small).encode(small)
    b = ResidualVQ(levels=2, codebook_size=32, epochs=2, seed=1).fit(small).encode(small)
    np.testing.assert_array_equal(a, b)


# --- collision strategies -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rkmeans", "rvq", "rqvae", "mq"])
def test_balanced_is_collision_free(name, X, request):
    tok = request.getfixturevalue(name)
    raw, balanced = tok.encode(X), tok.encode_balanced(X)
    assert len(np.unique(raw, axis=0)) < len(X)
    assert len(np.unique(balanced, axis=0)) == len(X)
    np.testing.assert_array_equal(raw[:, :-1], balanced[:, :-1])
    assert "balanced" in tok.collision_strategies


def test_balanced_needs_room_in_the_last_level(X):
    tok = ResidualKMeans(levels=2, codebook_size=2, niter=2).fit(X[:50])
    with pytest.raises(GridError, match="dedup"):
        tok.encode_balanced(X[:50])


def test_dedup_and_random_strategies(X, rkmeans):
    codes = rkmeans.encode(X)
    assert assign_sids(codes, rkmeans.vocab_sizes, "dedup").num_unique == len(X)
    coarse = ResidualKMeans(levels=1, codebook_size=16, niter=5).fit(X).encode(X)
    sids = assign_sids(coarse, (16,), "random")
    groups = torch.arange(sids.num_unique).repeat(20)
    items = sids.pick_items(groups, torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(coarse[items], sids.unique_codes[groups.numpy()])
    assert len(np.unique(items)) > sids.num_unique  # several members get picked


def test_opq_has_no_balanced_strategy(X, opq):
    assert "balanced" not in opq.collision_strategies
    with pytest.raises(GridError, match="balanced"):
        opq.encode_balanced(X)
    cfg = OmegaConf.create({"name": "opq", "collisions": "balanced"})
    with pytest.raises(GridError, match="balanced"):
        build_tokenizer(cfg)


# --- persistence and bad input ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["rkmeans", "opq", "rvq"])
def test_save_load_roundtrip(name, X, tmp_path, request):
    tok = request.getfixturevalue(name)
    tok.save(tmp_path / "tok.pkl")
    loaded = Tokenizer.load(tmp_path / "tok.pkl")
    np.testing.assert_array_equal(loaded.encode(X), tok.encode(X))
    with pytest.raises(GridError, match="dimension"):
        loaded.encode(X[:, :128])


def test_load_as_wrong_class(tmp_path, rkmeans):
    rkmeans.save(tmp_path / "tok.pkl")
    with pytest.raises(GridError):
        OptimizedPQ.load(tmp_path / "tok.pkl")


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_bad_inputs(name, X):
    cls = TOKENIZERS[name]
    with pytest.raises(GridError, match="codebook_size"):
        cls(codebook_size=256).fit(X[:100])
    bad = X[:300].copy()
    bad[3, 5] = np.nan
    with pytest.raises(GridError, match="NaN"):
        cls().fit(bad)
    with pytest.raises(GridError, match="non-empty"):
        cls().fit(X[:0])
    with pytest.raises(GridError, match="not fitted"):
        cls().encode(X[:10])


def test_opq_subspaces_must_divide_dimension(X):
    with pytest.raises(GridError, match="subspaces"):
        OptimizedPQ(subspaces=7).fit(X[:1000])
