import numpy as np
import pytest
from omegaconf import OmegaConf

from grid.cache import StageCache
from grid.config import compose
from grid.pipeline import Stages, embed, tokenize
from grid.runner import model_key
from grid.tokenizers import ResidualKMeans


def test_build_failure_leaves_nothing(tmp_path):
    cache = StageCache(tmp_path)

    def broken(folder):
        (folder / "half.npy").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get("sids", "k1", broken)
    assert not any((tmp_path / "sids").iterdir())
    folder, hit = cache.get("sids", "k1", lambda f: (f / "ok").write_text("1"))
    assert not hit and (folder / "ok").is_file()
    assert cache.get("sids", "k1", broken) == (folder, True)  # finished stage is reused


def test_tokenizer_cache_key_follows_every_field(tmp_path, beauty_embeddings):
    cache = StageCache(tmp_path)
    X = beauty_embeddings[:2000]
    base = OmegaConf.create(
        {
            "name": "rkmeans",
            "levels": 2,
            "codebook_size": 16,
            "niter": 5,
            "normalize_residuals": False,
            "seed": 0,
            "collisions": "dedup",
        }
    )
    sids, key, _ = tokenize(X, "emb-a", base, cache)
    again, key2, _ = tokenize(X, "emb-a", base.copy(), cache)
    assert key2 == key and np.array_equal(again.codes, sids.codes)
    keys = {key}
    for field, value in [
        ("levels", 3),
        ("codebook_size", 8),
        ("niter", 6),
        ("seed", 1),
        ("normalize_residuals", True),
        ("collisions", "random"),
    ]:
        changed = base.copy()
        changed[field] = value
        keys.add(tokenize(X, "emb-a", changed, cache)[1])
    keys.add(tokenize(X, "emb-b", base, cache)[1])  # other embeddings
    assert len(keys) == 8


def test_embedding_cache_key(tmp_path, beauty, beauty_split):
    cache = StageCache(tmp_path)
    small = type(beauty)(beauty.name, beauty.item_ids[:50], beauty.items[:50], [], [], "fp1")
    cfg = OmegaConf.load("configs/encoder/minilm.yaml")
    X, key = embed(small, beauty_split, cfg, cache)
    assert embed(small, beauty_split, cfg, cache)[1] == key
    cfg2 = cfg.copy()
    cfg2.fields = ["title"]
    assert embed(small, beauty_split, cfg2, cache)[1] != key
    small.fingerprint = "fp2"
    assert embed(small, beauty_split, cfg, cache)[1] != key


def test_model_key_ignores_inference_only_fields(beauty, beauty_split):
    stages = Stages(beauty, beauty_split, np.zeros((1, 1)), "emb", sids_key="sids")
    key = model_key(compose(), stages)
    assert model_key(compose(None, ["generator.beam_width=30"]), stages) == key
    assert model_key(compose(None, ["trainer.eval_batch_size=64"]), stages) == key
    assert model_key(compose(None, ["trainer.batch_size=64"]), stages) != key
    assert model_key(compose(None, ["generator.d_model=64"]), stages) != key
    assert model_key(compose(None, ["data.max_history=10"]), stages) != key
    assert model_key(compose(None, ["seed=1"]), stages) != key


def test_pipeline_balanced_and_train_only_fit(tmp_path, beauty_embeddings):
    cache = StageCache(tmp_path)
    X = beauty_embeddings[:3000]
    cfg = OmegaConf.create(
        {
            "name": "rkmeans",
            "levels": 2,
            "codebook_size": 256,
            "niter": 5,
            "seed": 0,
            "collisions": "balanced",
            "fit_items": "all",
        }
    )
    sids, _, report = tokenize(X, "emb", cfg, cache)
    assert sids.num_unique == sids.num_items == 3000 and sids.length == 2
    assert report["collision_strategy"] == "balanced"
    cfg.collisions, cfg.fit_items = "dedup", "train"
    seen = np.arange(0, 3000, 2)
    _, key, _ = tokenize(X, "emb", cfg, cache, seen)
    tokenizer = ResidualKMeans.load(tmp_path / "sids" / key / "tokenizer.pkl")
    reference = ResidualKMeans(2, 256, niter=5, seed=0).fit(X[seen])
    np.testing.assert_array_equal(tokenizer.codebooks_[0], reference.codebooks_[0])


def test_concat_encoder_joins_cached_parts(beauty, beauty_split, beauty_embeddings, stage_cache):
    mf = {"name": "cf", "method": "mf", "dim": 8, "epochs": 1, "seed": 0}
    cfg = OmegaConf.create({"name": "concat", "parts": ["minilm", mf], "normalize": True})
    X, key = embed(beauty, beauty_split, cfg, stage_cache)
    assert X.shape == (beauty.num_items, 384 + 8)
    np.testing.assert_allclose(X[:, :384], beauty_embeddings, atol=1e-6)  # MiniLM is unit norm
    np.testing.assert_allclose(np.linalg.norm(X[:, 384:], axis=1), 1.0, atol=1e-5)
    cfg.parts[1].seed = 1
    assert embed(beauty, beauty_split, cfg, stage_cache)[1] != key
