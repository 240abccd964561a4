"""Full-ranking metrics for leave-one-out evaluation (one held-out item per user)."""

from __future__ import annotations

import numpy as np
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


class RankingTotals:
    """Metric sums over users (all, warm and cold) and per-item recommendation counts.

    Accumulated batch by batch, so any split into batches (or processes, after summing the
    totals) gives the same results. A user is warm when its target item appears in the training
    sequences. Coverage@K: distinct items in the top-K lists / catalogue size; Entropy@K: entropy
    (natural log) of how often each item appears in the top-K lists. With `per_user`, it also
    keeps every user's Recall@K and NDCG@K for paired tests (`per_user_results`).
    """

    def __init__(
        self, num_items: int, ks=KS, device: torch.device | str = "cpu", per_user: bool = False
    ):
        self.num_items, self.ks = num_items, tuple(ks)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(len(self.ks), num_items, dtype=torch.float64, device=device)
        self.rows: list[dict[str, torch.Tensor]] | None = [] if per_user else None

    def update(
        self,
        ranked: torch.Tensor,
        target: torch.Tensor,
        warm: torch.Tensor | None = None,
        user: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: ranked item ids `[B, >=max(ks)]` (-1: none), targets `[B]`, warm `[B]`
        and, when keeping per-user rows, user ids `[B]`."""
        per_user = rank_metrics(ranked, target, self.ks)
        if self.rows is not None:
            if user is None:
                raise ValueError("per-user totals need the batch's user ids")
            flags = {} if warm is None else {"warm": warm}
            self.rows.append({"user": user, **flags, **per_user})
        per_user["users"] = torch.ones_like(target, dtype=torch.float64)
        # group sums through 0/1 weights and counts through index_add_: no boolean indexing or
        # bincount, whose data-dependent sizes make a GPU wait for the host
        groups = {"": None} if warm is None else {"": None, "warm/": warm, "cold/": ~warm}
        for prefix, mask in groups.items():
            weight = None if mask is None else mask.double()
            for name, values in per_user.items():
                values = values.double()
                total = (values if weight is None else values * weight).sum()
                self.sums[prefix + name] = self.sums.get(prefix + name, 0.0) + total
        for row, k in enumerate(self.ks):
            top = ranked[:, :k].flatten()
            self.counts[row].index_add_(0, top.clamp(min=0), (top >= 0).to(self.counts.dtype))

    def reduce(self, fn) -> None:
        """Replace every total by `fn(total)`, e.g. a sum across processes."""
        self.sums = {name: fn(self.sums[name]) for name in sorted(self.sums)}
        self.counts = fn(self.counts)

    def results(self) -> dict[str, float]:
        """Mean metrics per group (groups without users are left out), user counts of the warm
        and cold groups, coverage@K and entropy@K."""
        out = {}
        for name, total in self.sums.items():
            group, _, metric = name.rpartition("/")
            if metric == "users":
                if group:
                    out[name] = float(total)
                continue
            users = float(self.sums[f"{group}/users" if group else "users"])
            if users > 0:
                out[name] = float(total) / users
        for row, k in enumerate(self.ks):
            counts = self.counts[row]
            out[f"coverage@{k}"] = float((counts > 0).sum()) / self.num_items
            p = counts[counts > 0] / counts.sum().clamp(min=1)
            out[f"entropy@{k}"] = float(-(p * p.log()).sum())
        return out

    def per_user_results(self) -> dict[str, np.ndarray]:
        """The kept rows as arrays (`user`, `warm`, `recall@K`, `ndcg@K`), one row per user sorted
        by user id; a user seen twice (a distributed sampler's padding) counts once."""
        if not self.rows:
            return {}
        rows = {
            name: torch.cat([r[name] for r in self.rows]).cpu().numpy() for name in self.rows[0]
        }
        _, first = np.unique(rows["user"], return_index=True)
        return {name: values[first] for name, values in rows.items()}
