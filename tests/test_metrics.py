import math

import lightning as L
import numpy as np
import pytest
import torch

from grid.data import SequenceDataModule, leave_one_out, pad
from grid.generators.sasrec import SASRec
from grid.generators.tiger import TIGER
from grid.metrics import KS, rank_metrics


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

QUIET = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def validate(model, split, eval_batch_size: int) -> dict[str, float]:
    """Recall/NDCG over every validation user through Lightning, as `grid run` computes them."""
    dm = SequenceDataModule(split, eval_batch_size=eval_batch_size)
    out = L.Trainer(**QUIET).validate(model, dm.full_val_dataloader(), verbose=False)[0]
    return {k: v for k, v in out.items() if "@" in k}


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
