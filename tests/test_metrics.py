import math

import numpy as np
import torch

from grid.metrics import rank_metrics


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
