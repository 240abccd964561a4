import math

import lightning as L
import numpy as np
import pytest
import scipy.stats
import torch

from grid.config import ROOT
from grid.data import SequenceDataModule, leave_one_out, pad, read_items
from grid.generators.popularity import Popularity
from grid.generators.sasrec import SASRec
from grid.generators.tiger import TIGER
from grid.metrics import KS, RankingTotals, category_matrix, item_categories, rank_metrics
from tests.conftest import QUIET


def brute_force(ranked: list[list[int]], targets: list[int], k: int) -> tuple[float, float]:
    recall = ndcg = 0.0
    for row, target in zip(ranked, targets, strict=True):
        for position, item in enumerate(row[:k]):
            if item == target:
                recall += 1
                ndcg += 1 / math.log2(position + 2)
                break
    return recall / len(targets), ndcg / len(targets)


def test_hand_made_rankings():
    ranked = torch.tensor([[3, 1, 2], [5, 6, 7], [9, 8, 4]])
    target = torch.tensor([3, 7, 1])
    m = rank_metrics(ranked, target, ks=(1, 3))
    assert m["recall@1"].tolist() == [1, 0, 0]
    assert m["recall@3"].tolist() == [1, 1, 0]
    assert np.allclose(m["ndcg@3"].tolist(), [1.0, 1 / math.log2(4), 0.0])


def test_random_rankings_match_brute_force():
    g = torch.Generator().manual_seed(0)
    ranked = torch.stack([torch.randperm(50, generator=g)[:20] for _ in range(300)])
    ranked[::7, 5] = -1  # padded slots never match
    target = torch.randint(0, 50, (300,), generator=g)
    m = rank_metrics(ranked, target)
    for k in (1, 5, 10, 20):
        recall, ndcg = brute_force(ranked.tolist(), target.tolist(), k)
        assert math.isclose(m[f"recall@{k}"].mean().item(), recall, rel_tol=1e-6)
        assert math.isclose(m[f"ndcg@{k}"].mean().item(), ndcg, rel_tol=1e-5)


# --- the evaluation loop: metrics over all users, whatever the batching -------------------------


def validate(model, split, eval_batch_size: int) -> dict[str, float]:
    """Recall/NDCG over every validation user through Lightning, as `grid run` computes them."""
    dm = SequenceDataModule(split, eval_batch_size=eval_batch_size)
    out = L.Trainer(**QUIET).validate(model, dm.full_val_dataloader(), verbose=False)[0]
    return {k: v for k, v in out.items() if k.split("@")[0] in ("valid/recall", "valid/ndcg")}


def brute_force_all(ranked: list[list[int]], targets: list[int]) -> dict[str, float]:
    out = {}
    for k in KS:
        out[f"valid/recall@{k}"], out[f"valid/ndcg@{k}"] = brute_force(ranked, targets, k)
    return out


def assert_same(found: dict[str, float], expect: dict[str, float]) -> None:
    assert found.keys() == expect.keys()
    for name, value in expect.items():  # one user's hit moves a metric by >= 1/22,363
        assert math.isclose(found[name], value, rel_tol=1e-5, abs_tol=1e-7), name


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_sasrec_metrics_are_a_mean_over_all_users(beauty, beauty_split):
    torch.manual_seed(0)
    model = SASRec(beauty.num_items, hidden=32, blocks=1, dropout=0.0, lr=5e-3)
    dm = SequenceDataModule(beauty_split, batch_size=256)
    L.Trainer(max_steps=40, limit_val_batches=0, **QUIET).fit(model, dm.train_dataloader())
    model = model.double().eval()
    small, large = validate(model, beauty_split, 7), validate(model, beauty_split, 4096)
    # brute force: users in file order (not the loader's length order), ranked by numpy
    histories, targets = beauty_split.valid
    ranked = []
    with torch.no_grad():
        for start in range(0, len(targets), 1000):
            rows = histories[start : start + 1000]
            batch = {
                "history": torch.as_tensor(pad(rows)),
                "length": torch.tensor([len(h) for h in rows]),
            }
            scores = model.scores(batch).numpy()
            top = np.argpartition(-scores, 20, axis=1)[:, :20]
            order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
            ranked += np.take_along_axis(top, order, axis=1).tolist()
    expect = brute_force_all(ranked, targets.tolist())
    assert expect["valid/recall@20"] > 0.01  # a model with real hits, not an all-zero table
    assert_same(small, expect)
    assert_same(large, expect)


@pytest.mark.usefixtures("one_thread")
def test_tiger_metrics_are_a_mean_over_all_users(beauty):
    from .test_tiger import SMALL, cooccurrence_sids, subset

    split = leave_one_out(subset(beauty, 150), 20)
    sids = cooccurrence_sids(split.train, 150, 8)
    model = TIGER(sids, **{**SMALL, "bf16": False}).eval()
    small, large = validate(model, split, 7), validate(model, split, 4096)
    histories, targets = split.valid
    ranked = []
    for start in range(0, len(targets), 50):  # file order, 50 users at a time
        rows = histories[start : start + 50]
        batch = {
            "user": torch.arange(start, start + len(rows)),
            "history": torch.as_tensor(pad(rows)),
            "length": torch.tensor([len(h) for h in rows]),
        }
        ranked += model.recommend(batch, 20).tolist()
    expect = brute_force_all(ranked, targets.tolist())
    assert expect["valid/recall@20"] > 0.05
    assert_same(small, expect)
    assert_same(large, expect)


# --- warm/cold, coverage and entropy over a real evaluation -----------------------------------


@pytest.fixture(scope="module")
def first_users(beauty):
    """The first 2,000 Beauty users over the full catalogue: many test targets are cold."""
    return leave_one_out(beauty.sequences[:2000], 20)


def untrained_sasrec(num_items: int) -> SASRec:
    torch.manual_seed(0)  # random weights: diverse top-K lists; float64: batch-size independent
    return SASRec(num_items, hidden=16, blocks=1).double()


def test_warm_and_cold_users_add_up_to_overall(beauty, first_users):
    split = first_users
    dm = SequenceDataModule(split, eval_batch_size=128)
    seen = set(np.concatenate(split.train).tolist())
    cold_targets = sum(int(t) not in seen for t in split.test[1])
    assert 0 < cold_targets < len(split.test[1])  # both groups are exercised
    pop = Popularity(beauty.num_items, split.train)
    for model in (pop, untrained_sasrec(beauty.num_items)):
        (m,) = L.Trainer(**QUIET).test(model, dm.test_dataloader(), verbose=False)
        assert m["test/cold_users/users"] == cold_targets
        assert m["test/warm_users/users"] + m["test/cold_users/users"] == len(split.test[1])
        for name in [f"{metric}@{k}" for metric in ("recall", "ndcg") for k in KS]:
            weighted = (
                m[f"test/warm_users/{name}"] * m["test/warm_users/users"]
                + m[f"test/cold_users/{name}"] * m["test/cold_users/users"]
            ) / len(split.test[1])
            assert math.isclose(weighted, m[f"test/{name}"], rel_tol=1e-5, abs_tol=1e-7), name
    assert m["test/warm_users/recall@20"] > 0  # the random model still hits some warm targets
    (m,) = L.Trainer(**QUIET).test(pop, dm.test_dataloader(), verbose=False)
    assert m["test/cold_users/recall@20"] == 0  # popularity never recommends an unseen item


def test_coverage_and_entropy_equal_direct_computation(beauty, first_users):
    dm = SequenceDataModule(first_users, eval_batch_size=128)
    model = untrained_sasrec(beauty.num_items).eval()
    (m,) = L.Trainer(**QUIET).test(model, dm.test_dataloader(), verbose=False)
    with torch.no_grad():
        lists = torch.cat([model.recommend(b, max(KS)) for b in dm.test_dataloader()]).numpy()
    assert len(lists) == 2000
    for k in KS:
        items, counts = np.unique(lists[:, :k], return_counts=True)
        assert math.isclose(m[f"test/coverage@{k}"], len(items) / beauty.num_items, rel_tol=1e-6)
        assert math.isclose(m[f"test/item_entropy@{k}"], scipy.stats.entropy(counts), rel_tol=1e-6)
    assert 0.05 < m["test/coverage@10"] < 1  # diverse lists, not one popular top-10


def test_several_eval_batches_equal_one(beauty, first_users):
    model = untrained_sasrec(beauty.num_items)
    results = []
    for size in (2000, 97):  # 97: 21 batches of unequal sizes, the last one short
        dm = SequenceDataModule(first_users, eval_batch_size=size)
        (m,) = L.Trainer(**QUIET).test(model, dm.test_dataloader(), verbose=False)
        results.append({k: v for k, v in m.items() if not k.startswith("infer/")})
    assert results[0].keys() == results[1].keys() and "test/item_entropy@20" in results[0]
    for name, value in results[0].items():
        assert math.isclose(results[1][name], value, rel_tol=1e-6, abs_tol=1e-9), name


def test_totals_without_warm_flags_or_cold_users():
    totals = RankingTotals(num_items=6, ks=(1, 2))
    ranked, target = torch.tensor([[0, 1], [0, -1], [2, 3]]), torch.tensor([1, 0, 5])
    totals.update(ranked, target)
    assert totals.results() == pytest.approx(
        {
            "recall@1": 1 / 3,
            "recall@2": 2 / 3,
            "ndcg@1": 1 / 3,
            "ndcg@2": (1 + 1 / math.log2(3)) / 3,
            "coverage@1": 2 / 6,
            "coverage@2": 4 / 6,
            "item_entropy@1": scipy.stats.entropy([2, 1]),
            "item_entropy@2": scipy.stats.entropy([2, 1, 1, 1]),
            "random_recall@1": 1 / 6,  # a random ranking of the 6 items
            "random_recall@2": 2 / 6,
            "random_ndcg@1": 1 / 6,
            "random_ndcg@2": (1 + 1 / math.log2(3)) / 6,
        }
    )
    totals = RankingTotals(num_items=6, ks=(1,))
    totals.update(ranked, target, warm=torch.tensor([True, True, True]))
    out = totals.results()
    assert out["cold_users/users"] == 0 and "cold_users/recall@1" not in out
    assert out["warm_users/users"] == 3


def test_category_rules_on_the_bundled_items():
    """Scientific's category path counts its most specific level; a MovieLens item's n genres
    count 1/n each; an item without categories belongs to none."""
    _, scientific = read_items(ROOT / "data/amazon18_scientific_lcrec/items.jsonl.gz")
    assert item_categories(scientific[0]) == {"Capacitors": 1.0}
    _, movies = read_items(ROOT / "data/movielens_100k/items.jsonl.gz")
    assert item_categories(movies[0]) == {"Animation": 1 / 3, "Children's": 1 / 3, "Comedy": 1 / 3}
    assert item_categories({"categories": ["Beauty", "Makeup", "Nails"]}) == {"Nails": 1.0}
    assert item_categories({"categories": None}) == {}


def test_category_entropy_counts_each_lists_categories():
    items = [{"genres": ["a", "b"]}, {"genres": ["a"]}, {"genres": ["c"]}, {}]
    matrix = category_matrix(items)  # columns "", a, b, c
    ranked, target = torch.tensor([[0, 1], [0, 3], [2, 1]]), torch.tensor([0, 1, 2])
    totals = RankingTotals(num_items=4, ks=(1, 2), categories=matrix)
    totals.update(ranked, target)
    out = totals.results()
    # top-1: items 0, 0, 2 -> a 1/2 + 1/2, b 1/2 + 1/2, c 1
    assert out["category_entropy@1"] == pytest.approx(scipy.stats.entropy([1, 1, 1]))
    # top-2 adds items 1, 3, 1 -> a 1 + 2, b 1, c 1, none 1
    assert out["category_entropy@2"] == pytest.approx(scipy.stats.entropy([1, 3, 1, 1]))
    assert out["item_entropy@2"] == pytest.approx(scipy.stats.entropy([2, 2, 1, 1]))
    assert category_matrix([{"title": "x"}, {}]) is None  # no categories: no category entropy
