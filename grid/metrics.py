"""Full-ranking metrics for leave-one-out evaluation (one held-out item per user)."""

from __future__ import annotations

import torch

KS = (1, 5, 10, 20)


def hit_ranks(ranked: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each user's target in its ranked list, or -1 when it is missing."""
    hits = ranked == target[:, None]
    rank = hits.float().argmax(dim=1)
    return torch.where(hits.any(dim=1), rank, torch.full_like(rank, -1))


def rank_metrics(ranked: torch.Tensor, target: torch.Tensor, ks=KS) -> dict[str, torch.Tensor]:
    """Per-user Recall@K and NDCG@K (`[B]` each) for ranked item ids `[B, >=max(ks)]`."""
    rank = hit_ranks(ranked, target)
    found = rank >= 0
    gain = torch.where(found, 1.0 / torch.log2(rank.clamp(min=0).float() + 2.0), 0.0)
    out = {}
    for k in ks:
        inside = found & (rank < k)
        out[f"recall@{k}"] = inside.float()
        out[f"ndcg@{k}"] = torch.where(inside, gain, 0.0)
    return out
