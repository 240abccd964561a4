"""Tokenizers on the real Beauty MiniLM embeddings: reference agreement, training, SIDs, errors."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.stats import ortho_group

from grid.cache import StageCache
from grid.errors import GridError
from grid.pipeline import build_tokenizer, tokenize
from grid.sids import assign_sids, hash_uniform
from grid.tokenizers import (
    RQVAE,
    TOKENIZERS,
    MQTokenizer,
    OptimizedPQ,
    ResidualKMeans,
    ResidualVQ,
    Tokenizer,
)
from grid.tokenizers.balanced import squared_distances
from grid.tokenizers.base import single_threaded

ROOT = Path(__file__).resolve().parents[1]


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
    return ResidualVQ(levels=3, codebook_size=256, steps=200, batch_size=1024).fit(X)


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


def _rotation(opq: OptimizedPQ) -> np.ndarray:
    vt = faiss.downcast_VectorTransform(opq.index_.chain.at(opq.index_.chain.size() - 1))
    return faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)


def test_opq_matches_faiss_pipeline(X, opq):
    """Ours = faiss OPQ + PQ started from scipy's seeded random rotation, with a seeded PQ."""
    index = faiss.IndexPreTransform(
        faiss.OPQMatrix(X.shape[1], 16), faiss.IndexPQ(X.shape[1], 16, 8)
    )
    rotation = faiss.downcast_VectorTransform(index.chain.at(0))
    rotation.niter = 3
    faiss.copy_array_to_vector(
        ortho_group.rvs(X.shape[1], random_state=0).astype(np.float32).ravel(), rotation.A
    )
    rotation_pq = faiss.ProductQuantizer(X.shape[1], 16, 8)
    rotation_pq.cp.seed = 0
    rotation.pq = rotation_pq
    faiss.downcast_index(index.index).pq.cp.seed = 0
    with single_threaded():
        index.train(X)
    rotation.pq = None
    np.testing.assert_array_equal(opq.encode(X), index.sa_encode(X).astype(np.int64))
    assert opq.encode(X).shape == (len(X), 16) and not OptimizedPQ.ordered


def test_opq_rotation_follows_seed_and_codebook_size(X):
    """faiss alone learns the rotation with an 8-bit PQ from a fixed seed: ours must not."""
    small = X[:3000]

    def fit(**kw):
        return OptimizedPQ(subspaces=8, opq_iters=1, **kw).fit(small)

    base, again = fit(seed=0), fit(seed=0)
    other_seed, coarse = fit(seed=1), fit(seed=0, codebook_size=16)
    np.testing.assert_array_equal(_rotation(base), _rotation(again))
    np.testing.assert_array_equal(base.encode(small), again.encode(small))
    assert np.abs(_rotation(base) - _rotation(other_seed)).max() > 0.05
    assert (base.encode(small) != other_seed.encode(small)).mean() > 0.5
    assert np.abs(_rotation(base) - _rotation(coarse)).max() > 0.05
    R = _rotation(coarse)
    np.testing.assert_allclose(R @ R.T, np.eye(len(R)), atol=1e-4)


def test_opq_reconstruction_and_options(X, opq):
    err = np.linalg.norm(X - opq.reconstruct(opq.encode(X))) / np.linalg.norm(X)
    assert err < 0.7
    small = X[:3000]
    white = OptimizedPQ(subspaces=8, opq_iters=1, pca_dim=64, whiten=True).fit(small)
    err_white = np.linalg.norm(small - white.reconstruct(white.encode(small)))
    assert err_white / np.linalg.norm(small) < 1.0
    # whitening every component, those of (nearly) zero variance included, stays finite
    flat = np.hstack([small[:, :56], np.zeros((len(small), 8), np.float32)])
    full = OptimizedPQ(subspaces=8, codebook_size=16, opq_iters=1, pca_dim=64, whiten=True)
    codes = full.fit(flat).encode(flat)
    assert len(np.unique(codes, axis=0)) > 0.9 * len(flat)
    assert np.isfinite(full.reconstruct(codes)).all()
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
    a = ResidualVQ(levels=2, codebook_size=32, steps=20, seed=1).fit(small).encode(small)
    b = ResidualVQ(levels=2, codebook_size=32, steps=20, seed=1).fit(small).encode(small)
    c = ResidualVQ(levels=2, codebook_size=32, steps=20, seed=2).fit(small).encode(small)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_rvq_learns_by_adagrad_from_kmeanspp_seeds(X):
    """GRID's R-VQ: k-means++ seeds (data points, no Lloyd steps), then Adagrad on the level's
    straight-through loss sum ||sg(r) - c[nearest(r)]||^2; checked against two full-batch steps
    written out by hand."""
    small = X[:2000]
    unit = small / np.linalg.norm(small, axis=1, keepdims=True)
    seeds = ResidualVQ(levels=1, codebook_size=32, steps=0, seed=3).fit(small).codebooks_[0]
    gaps = np.sqrt(np.maximum(squared_distances(seeds, unit), 0)).min(1)
    assert gaps.max() < 1e-3 and len(np.unique(seeds, axis=0)) == 32  # seeds are items

    lr = 0.01
    tok = ResidualVQ(levels=1, codebook_size=32, steps=2, batch_size=len(small), lr=lr, seed=3)
    learned = tok.fit(small).codebooks_[0]
    C, G = seeds.astype(np.float64), np.zeros_like(seeds, dtype=np.float64)
    for _ in range(2):
        idx = squared_distances(unit, C).argmin(1)
        grad = np.zeros_like(C)
        np.add.at(grad, idx, 2 * (C[idx] - unit))
        G += grad**2
        C = C - lr * grad / (np.sqrt(G) + 1e-10)
    np.testing.assert_allclose(learned, C, atol=1e-5)
    assert np.abs(learned - seeds).max() > 0.5 * lr  # the step moved the codebook


def test_rvq_trains_levels_one_after_another(X):
    """Learning level 1 leaves level 0 as it was: earlier levels are frozen (GRID layer-wise)."""
    small = X[:2000]
    one = ResidualVQ(levels=1, codebook_size=16, steps=30, batch_size=256).fit(small)
    two = ResidualVQ(levels=2, codebook_size=16, steps=30, batch_size=256).fit(small)
    np.testing.assert_array_equal(one.codebooks_[0], two.codebooks_[0])
    assert two.loss_history_[1][-1] < two.loss_history_[1][0]


def test_rqvae_reconstruction_gradient_reaches_the_encoder(X):
    """Straight-through: the reconstruction loss, decoded from the quantised latent, passes
    its gradient at that latent on to the encoder (without it the encoder would get none)."""
    tok = RQVAE(levels=2, codebook_size=16, hidden=(64,), latent_dim=8, epochs=1).fit(X[:1000])
    x = tok.scaler_(X[:256])
    params = list(tok.encoder_.parameters())
    _, recon, _, _ = tok._losses(x)
    grads = torch.autograd.grad(recon, params, allow_unused=True)

    z = tok.encoder_(x)
    with torch.no_grad():
        quantised = tok._quantize(z)[1]
    zq = quantised.clone().requires_grad_()
    ref_recon = ((tok.decoder_(zq) - x) ** 2).sum(1).mean()
    (at_zq,) = torch.autograd.grad(ref_recon, zq)
    ref = torch.autograd.grad(z, params, grad_outputs=at_zq)
    assert float(recon.detach()) == pytest.approx(float(ref_recon.detach()), rel=1e-5)
    for g, r in zip(grads, ref, strict=True):
        assert g is not None and float(r.abs().max()) > 0
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)


# --- fit_items=train through the pipeline ---------------------------------------------------

FIT_ITEMS_CONFIGS = {
    "rvq": {"codebook_size": 16, "steps": 20, "batch_size": 512},
    "rqvae": {"codebook_size": 16, "epochs": 1, "hidden": [64], "latent_dim": 8},
    "mq": {"codebook_size": 16, "epochs": 1, "hidden": 64, "latent_dim": 8},
    "opq": {"codebook_size": 16, "subspaces": 8, "opq_iters": 1},
}


@pytest.mark.parametrize(
    "name",
    [
        "rvq",
        "opq",
        pytest.param("rqvae", marks=pytest.mark.slow),
        pytest.param("mq", marks=pytest.mark.slow),
    ],
)
def test_fit_items_train_fits_codebooks_on_training_items_only(name, X, beauty_split, tmp_path):
    """Perturbing items outside the training sequences leaves the fitted tokenizer unchanged;
    perturbing training items changes it."""
    cfg = OmegaConf.merge(
        OmegaConf.load(ROOT / "configs" / "tokenizer" / f"{name}.yaml"),
        {"fit_items": "train", **FIT_ITEMS_CONFIGS[name]},
    )
    train_items = np.unique(np.concatenate(beauty_split.train[:500]))  # the first 500 users
    others = np.setdiff1d(np.arange(len(X)), train_items)
    assert len(others) > len(X) // 2
    rng = np.random.default_rng(0)
    cache = StageCache(tmp_path)

    def fitted(Xp: np.ndarray, label: str) -> Tokenizer:
        _, key, _ = tokenize(Xp, label, cfg, cache, train_items)
        return Tokenizer.load(cache.path("sids", key) / "tokenizer.pkl")

    def moved(rows: np.ndarray) -> np.ndarray:
        Xp = X.copy()
        Xp[rows] += rng.normal(scale=0.05, size=(len(rows), X.shape[1])).astype(np.float32)
        return Xp

    base = fitted(X, "base")
    outside = fitted(moved(others), "outside")
    inside = fitted(moved(rng.choice(train_items, 200, replace=False)), "inside")
    vocab = np.array(base.vocab_sizes)
    grid_codes = (np.arange(64)[:, None] * (np.arange(len(vocab)) + 1)) % vocab
    np.testing.assert_array_equal(outside.reconstruct(grid_codes), base.reconstruct(grid_codes))
    np.testing.assert_array_equal(outside.encode(X), base.encode(X))
    assert not np.array_equal(inside.reconstruct(grid_codes), base.reconstruct(grid_codes))


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
    users = torch.arange(len(groups))
    items = sids.pick_items(groups[:, None], users).numpy()[:, 0]
    np.testing.assert_array_equal(coarse[items], sids.unique_codes[groups.numpy()])
    assert len(np.unique(items)) > sids.num_unique  # several members get picked
    # a user's draw is the same in any batch; another seed draws others
    alone = sids.pick_items(groups[5:9, None], users[5:9]).numpy()[:, 0]
    np.testing.assert_array_equal(alone, items[5:9])
    reseeded = sids.pick_items(groups[:, None], users, seed=1).numpy()[:, 0]
    assert (reseeded != items).any()


def test_hash_uniform_is_splitmix64():
    """The torch hash gives, bit for bit, SplitMix64's mixer over unsigned 64-bit integers."""

    def splitmix(*keys: int) -> float:
        x, mask = 0, (1 << 64) - 1
        for key in keys:
            x = (x + key + 0x9E3779B97F4A7C15) & mask
            x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
            x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
            x ^= x >> 31
        return (x >> 11) * 2.0**-53

    users = torch.tensor([0, 1, 7, 22362, 2**31 - 1, 2**40 + 5])
    groups = torch.tensor([0, 3, 12100, 2**20])
    drawn = hash_uniform(3, users[:, None], groups)
    expected = [[splitmix(3, u, g) for g in groups.tolist()] for u in users.tolist()]
    assert drawn.dtype == torch.float64
    assert drawn.tolist() == expected
    assert drawn.min() >= 0 and drawn.max() < 1


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
