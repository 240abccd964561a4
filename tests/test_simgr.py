"""SimGR: exact top-K over all items, aggregations, SIDs of any shape, checkpoints, training."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import grid.generators.simgr as simgr_module
from grid.data import SequenceDataModule, leave_one_out, pad
from grid.errors import GridError
from grid.generators import GENERATORS, PipelineInputs
from grid.generators.popularity import Popularity
from grid.generators.sasrec import SASRec
from grid.generators.simgr import AGGREGATIONS, SimGR, top_k_inner_product
from grid.generators.tiger import TIGER
from grid.sids import SemanticIDs, assign_sids
from grid.tokenizers.opq import OptimizedPQ
from grid.tokenizers.rkmeans import ResidualKMeans

SMALL = dict(d_model=32, num_heads=2, head_dim=16, d_ff=64, layers=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def trainer(**kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


@pytest.fixture(scope="module")
def rkmeans_codes(beauty_embeddings):
    """RK-Means codes (3 levels of 64) of every Beauty item's MiniLM embedding."""
    tok = ResidualKMeans(3, 64, niter=10)
    return tok.fit_encode(beauty_embeddings), tok.vocab_sizes


@pytest.fixture(scope="module")
def sids(rkmeans_codes):
    return assign_sids(*rkmeans_codes, "dedup")


def history_batch(sequences, n=64):
    """Training parts of the first n sequences, right-padded: lengths 1 to above 8."""
    histories = [s[:-2] for s in sequences[:n]]
    batch = {
        "history": torch.as_tensor(pad(histories)),
        "length": torch.tensor([len(h) for h in histories]),
    }
    return histories, batch


# --- exactness ------------------------------------------------------------------------------


def test_chunked_top_k_equals_argsort():
    g = torch.Generator().manual_seed(0)
    queries, items = torch.randn(50, 8, generator=g), torch.randn(1000, 8, generator=g)
    brute = torch.argsort(queries @ items.T, dim=1, descending=True)[:, :20]
    for chunk in (7, 64, 1000, 5000):  # chunks smaller than k, uneven, one and oversized
        assert torch.equal(top_k_inner_product(queries, items, 20, chunk=chunk)[1], brute)
    assert top_k_inner_product(queries, items[:5], 20, chunk=3)[1].shape == (50, 5)


@pytest.mark.parametrize("name", ["simgr-mean", "simgr-attention", "sasrec"])
def test_recommend_equals_argsort_of_full_scores(beauty, sids, monkeypatch, name):
    """Padded, truncated, chunk-merged batch top-K == argsort of each user's own full scores."""
    monkeypatch.setattr(simgr_module, "SCORE_CHUNK", 1000)  # 13 chunks of the 12,101 items
    torch.manual_seed(0)
    if name == "sasrec":
        model = SASRec(beauty.num_items, hidden=16, max_history=8)
    else:
        model = SimGR(sids, max_history=8, aggregation=name.split("-")[1], bf16=False, **SMALL)
        if name == "simgr-attention":  # a non-uniform attention over each item's tokens
            torch.nn.init.normal_(model.aggregate.query)
    model = model.double().eval()
    histories, batch = history_batch(beauty.sequences)
    assert batch["length"].max() > 8 and batch["length"].min() < 8
    with torch.no_grad():
        top = model.recommend(batch, 20)
        brute = []
        for h in histories:  # each history alone, unpadded, cut to its last 8 items
            h = torch.as_tensor(h[-8:])[None]
            one = {"history": h, "length": torch.tensor([h.shape[1]])}
            if name == "sasrec":
                scores = model.scores(one)
            else:  # item table from the token embeddings directly (not embedding_bag)
                table = model.aggregate(model.embed(model.item_tokens[:-1]))
                scores = model.user_embeddings(one["history"], one["length"]) @ table.T
            brute.append(torch.argsort(scores[0], descending=True)[:20])
    assert top.shape == (64, 20)
    assert torch.equal(top, torch.stack(brute))


def test_bf16_ranks_like_float32(beauty, sids):
    torch.manual_seed(0)
    model = SimGR(sids, max_history=8, **SMALL).eval()
    with torch.no_grad():
        model.embed.weight.normal_()  # spread-out scores, as after training
    _, batch = history_batch(beauty.sequences)
    with torch.no_grad():
        fast = model.recommend(batch, 20)
        model.bf16 = False
        exact = model.recommend(batch, 20)
    shared = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fast, exact, strict=True)]
    assert np.mean(shared) > 0.9 * 20, np.mean(shared)


def test_faiss_search_and_cached_table_match_matmul(beauty, sids):
    torch.manual_seed(0)
    model = SimGR(sids, search="faiss", bf16=False, **SMALL).eval()  # faiss scores in fp32
    _, batch = history_batch(beauty.sequences)
    plain = model.recommend(batch, 20)  # no evaluation running: no index, plain matmul
    model._eval_start()
    assert model._index is not None and model._index.ntotal == sids.num_items
    assert torch.equal(model.recommend(batch, 20), plain)


def test_pads_when_k_exceeds_catalogue():
    sids = SemanticIDs(np.array([[0, 1], [1, 0], [1, 1]]), (2, 2))
    model = SimGR(sids, **SMALL).eval()
    top = model.recommend({"history": torch.tensor([[0, 2]]), "length": torch.tensor([2])}, 5)
    assert sorted(top[0, :3].tolist()) == [0, 1, 2] and top[0, 3:].tolist() == [-1, -1]


# --- any SIDs, any aggregation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def opq_sids(beauty_embeddings):
    tok = OptimizedPQ(subspaces=8, codebook_size=16, opq_iters=2)
    return assign_sids(tok.fit_encode(beauty_embeddings), tok.vocab_sizes, "random", ordered=False)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kind", ["rkmeans-dedup", "rkmeans-one-level", "opq-unordered"])
def test_trains_and_recommends_with_any_sids(beauty, rkmeans_codes, opq_sids, kind, aggregation):
    if kind == "rkmeans-dedup":
        sids = assign_sids(*rkmeans_codes, "dedup")
    elif kind == "rkmeans-one-level":
        sids = SemanticIDs(rkmeans_codes[0][:, :1], rkmeans_codes[1][:1])  # collisions
    else:
        sids = opq_sids
    model = SimGR(sids, aggregation=aggregation, **SMALL)
    histories, batch = history_batch(beauty.sequences)
    batch["target"] = torch.as_tensor([s[-2] for s in beauty.sequences[:64]])
    loss = F.cross_entropy(model.scores(batch), batch["target"])
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():  # one token leaves attention nothing to weigh
        if not (name == "aggregate.query" and sids.length == 1):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    top = model.eval().recommend(batch, 10)
    assert top.shape == (64, 10) and ((top >= 0) & (top < sids.num_items)).all()
    assert all(len(set(row)) == 10 for row in top.tolist())


# --- config and errors ------------------------------------------------------------------------


def test_bad_parameters_raise_one_line_errors(sids):
    inputs = PipelineInputs(num_items=sids.num_items, num_users=1, train_sequences=[])
    with pytest.raises(GridError, match="semantic IDs"):
        GENERATORS["simgr"].build(inputs)
    inputs.sids = sids
    assert isinstance(GENERATORS["simgr"].build(inputs, **SMALL), SimGR)
    for params, match in [
        ({"tau": 0.0}, r"^generator.tau=0.0 is out of range; set it to a value > 0$"),
        ({"tau": -1}, "generator.tau=-1 is out of range"),
        ({"aggregation": "max"}, "generator.aggregation='max' is not one of mean, concat"),
        ({"search": "hnsw"}, "generator.search='hnsw' is not one of matmul, faiss"),
        ({"max_history": 0}, "max_history=0"),
    ]:
        with pytest.raises(GridError, match=match) as e:
            SimGR(sids, **params)
        assert "\n" not in str(e.value)


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_must_match_generator_and_sids(beauty, rkmeans_codes, sids, tmp_path):
    split = leave_one_out(beauty.sequences[:300], 20)
    loader = SequenceDataModule(split, batch_size=64).train_dataloader()
    model = SimGR(sids, **SMALL)
    fit = trainer(max_steps=2)
    fit.fit(model, loader)
    path = tmp_path / "simgr.ckpt"
    fit.save_checkpoint(path)

    same = SimGR(sids, **SMALL)
    same.load_checkpoint(path)
    assert torch.equal(same.embed.weight, model.embed.weight)

    codes, vocab = rkmeans_codes
    other_vocab = assign_sids(codes % 32, (32, 32, 32), "dedup")
    shuffled = assign_sids(codes[np.random.default_rng(0).permutation(len(codes))], vocab, "dedup")
    assert shuffled.vocab_sizes == sids.vocab_sizes  # same vocabulary, other item -> SID map
    for wrong, match in [
        (TIGER(sids, d_model=32, num_heads=2, head_dim=16, d_ff=64), "generator SimGR"),
        (SimGR(other_vocab, **SMALL), "SID vocabulary sizes"),
        (SimGR(shuffled, **SMALL), "semantic IDs"),
    ]:
        with pytest.raises(GridError, match=match) as e:
            wrong.load_checkpoint(path)
        assert "\n" not in str(e.value)
    # resuming training through Lightning runs the same check
    with pytest.raises(GridError, match="SID vocabulary sizes"):
        trainer(max_steps=3).fit(SimGR(other_vocab, **SMALL), loader, ckpt_path=path)


# --- training ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_training_beats_popularity(beauty, rkmeans_codes):
    """On Beauty's 1,000 most popular items (about 9,600 users), a few hundred steps."""
    items = 1000
    counts = np.bincount(np.concatenate(beauty.sequences), minlength=beauty.num_items)
    keep = np.argsort(-counts, kind="stable")[:items]
    remap = np.full(beauty.num_items, -1)
    remap[keep] = np.arange(items)
    seqs = [s for s in (remap[s][remap[s] >= 0] for s in beauty.sequences) if len(s) >= 3]
    codes, vocab = rkmeans_codes
    sids = assign_sids(codes[keep], vocab, "dedup")  # SIDs from the full-catalogue codebooks
    split = leave_one_out(seqs, 20)
    dm = SequenceDataModule(split, batch_size=128, eval_batch_size=256, val_users=1000)
    L.seed_everything(0, verbose=False)
    model = SimGR(sids, d_model=32, num_heads=2, head_dim=16, d_ff=64, layers=1, lr=3e-3)
    trainer(max_steps=300, limit_val_batches=0).fit(model, dm.train_dataloader())
    ours = trainer().validate(model, dm.val_dataloader(), verbose=False)[0]
    pop = trainer().validate(Popularity(items, split.train), dm.val_dataloader(), verbose=False)
    ours_r, pop_r = ours["valid/recall@10"], pop[0]["valid/recall@10"]
    assert ours_r > 1.5 * pop_r, (ours_r, pop_r)
    assert ours["valid/ndcg@10"] > pop[0]["valid/ndcg@10"]
