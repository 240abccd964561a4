import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
from filelock import FileLock
from omegaconf import OmegaConf

from grid.cache import DONE, StageCache
from grid.config import compose
from grid.generators import GENERATORS
from grid.pipeline import Stages, embed, prepare, tokenize
from grid.runner import model_key
from grid.tokenizers import ResidualKMeans


def test_build_failure_leaves_nothing(tmp_path):
    cache = StageCache(tmp_path)

    def broken(folder):
        (folder / "half.npy").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.get("sids", "k1", broken)
    assert [p.name for p in (tmp_path / "sids").iterdir()] == ["k1.lock"]
    folder, hit = cache.get("sids", "k1", lambda f: (f / "ok").write_text("1"))
    assert not hit and (folder / "ok").is_file()
    assert cache.get("sids", "k1", broken) == (folder, True)  # finished stage is reused


def _slow_build(folder):
    """A build that takes a while and says who built it."""
    with open(folder.parents[1] / "builds.txt", "a") as f:
        f.write(f"{os.getpid()}\n")
    (folder / "part1").write_text(str(os.getpid()))
    time.sleep(0.5)
    (folder / "part2").write_text(str(os.getpid()))


def _get_in_child(root, start, results):
    start.wait()
    folder, hit = StageCache(root).get("sids", "k", _slow_build)
    files = {p.name: p.read_text() for p in sorted(folder.iterdir())}
    results.put((str(folder), hit, files))


def test_concurrent_builds_share_one_complete_result(tmp_path):
    ctx = multiprocessing.get_context("fork")  # the children only touch files
    start, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_get_in_child, args=(tmp_path, start, results)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len({folder for folder, _, _ in got}) == 1
    assert sorted(hit for _, hit, _ in got) == [False, True, True]
    files = [f for _, _, f in got]
    assert files[0] == files[1] == files[2] and set(files[0]) == {"part1", "part2", DONE}
    assert files[0]["part1"] == files[0]["part2"]  # one builder's complete output
    assert len((tmp_path / "builds.txt").read_text().split()) == 1
    assert sorted(p.name for p in (tmp_path / "sids").iterdir()) == ["k", "k.lock"]


def test_a_publish_that_lost_the_race_keeps_the_winners_folder(tmp_path):
    cache = StageCache(tmp_path)
    final = cache.path("sids", "k")

    def racing_build(folder):  # another writer (say, on a file system without locks) wins
        (folder / "x").write_text("mine")
        final.mkdir()
        (final / "x").write_text("theirs")
        (final / DONE).write_text("k")

    folder, _ = cache.get("sids", "k", racing_build)
    assert folder == final and (final / "x").read_text() == "theirs"
    assert not list((tmp_path / "sids").glob(".tmp-*"))


def _build_forever(root, key, started):
    def build(folder):
        (folder / "half").write_text("x")
        started.set()
        time.sleep(600)

    StageCache(root).get("sids", key, build)


def test_temp_folders_of_killed_builds_are_removed(tmp_path):
    ctx = multiprocessing.get_context("fork")
    builders = {}
    for key in ("k1", "k2"):  # two builds killed mid-way
        started = ctx.Event()
        builders[key] = ctx.Process(target=_build_forever, args=(tmp_path, key, started))
        builders[key].start()
        assert started.wait(60)
    for p in builders.values():
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    stage = tmp_path / "sids"
    (stage / ".tmp-k3-alive").mkdir()  # a build of k3 in progress: its lock is held
    with FileLock(stage / "k3.lock"):
        assert len(list(stage.glob(".tmp-k1-*"))) == len(list(stage.glob(".tmp-k2-*"))) == 1
        folder, hit = StageCache(tmp_path).get("sids", "k1", lambda f: (f / "ok").write_text("1"))
        assert not hit and sorted(p.name for p in folder.iterdir()) == [DONE, "ok"]
        assert [p.name for p in stage.glob(".tmp-*")] == [".tmp-k3-alive"]


def test_generators_run_and_key_only_the_stages_they_consume(small_beauty, tmp_path):
    cache = StageCache(tmp_path)
    data = ["data=custom", f"data.path={small_beauty}"]
    keys = {}
    for encoder in ("minilm", "text_cf"):
        cfg = compose(None, [*data, "generator=sasrec", f"encoder={encoder}"])
        stages = prepare(cfg, cache, GENERATORS["sasrec"].consumes)
        assert stages.embeddings is None and stages.sids is None
        keys[encoder] = model_key(cfg, stages)
    assert keys["minilm"] == keys["text_cf"]
    assert not (tmp_path / "embeddings").exists()
    cfg = compose(None, data)  # TIGER: the key follows the SIDs (and so the encoder)
    a, b = (Stages(stages.dataset, stages.split, sids_key=k) for k in ("a", "b"))
    assert model_key(cfg, a) != model_key(cfg, b)


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
