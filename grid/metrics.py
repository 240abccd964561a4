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


def item_categories(item: dict) -> dict[str, float]:
    """An item's categories and their weights (summing to 1): SimGR's Entropy@K counts
    categories. A path (Scientific's `"A,B,C"`, or the list a metadata fetch keeps) gives its
    most specific level; MovieLens `genres` count 1/n each; none: {}."""
    genres = item.get("genres")
    if isinstance(genres, list) and genres:
        return {str(g): 1.0 / len(genres) for g in genres}
    path = item.get("categories")
    if isinstance(path, str):
        path = path.split(",")
    names = [str(p).strip() for p in path or [] if str(p).strip()]
    return {names[-1]: 1.0} if names else {}


def category_matrix(items: list[dict]) -> torch.Tensor | None:
    """Weights `[num_items, num_categories]` (float64) of every item's categories; None when no
    item has one. Items without a category form the category ""."""
    weights = [item_categories(item) for item in items]
    if not any(weights):
        return None
    names = sorted({name for w in weights for name in w} | {""})
    column = {name: i for i, name in enumerate(names)}
    matrix = torch.zeros(len(items), len(names), dtype=torch.float64)
    for row, w in enumerate(weights):
        for name, weight in (w or {"": 1.0}).items():
            matrix[row, column[name]] = weight
    return matrix


def entropy(counts: torch.Tensor) -> float:
    """Entropy (natural log) of the distribution proportional to `counts`."""
    p = counts[counts > 0] / counts.sum().clamp(min=1e-12)
    return float(-(p * p.log()).sum())


def random_metrics(items: int, ks=KS) -> dict[str, float]:
    """Expected Recall@K and NDCG@K of a uniformly random ranking of `items` items, one target."""
    out = {}
    for k in ks:
        top = min(k, items)
        out[f"random_recall@{k}"] = top / items
        out[f"random_ndcg@{k}"] = float((1.0 / np.log2(np.arange(top) + 2.0)).sum()) / items
    return out


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
    totals) gives the same results. Two warm/cold splits: `warm_users/` and `cold_users/` rank
    the whole catalogue for the users whose target appears (or not) in the training sequences;
    `warm_items/` and `cold_items/` (SETRec's paper and code, added by `update_items`) rank only
    the group's items for the users whose target is in the group. Coverage@K: distinct items
    in the top-K lists / catalogue size; item_entropy@K: entropy (natural log) of how often each
    item appears in the top-K lists; with `categories` (`category_matrix`), category_entropy@K:
    the same over the lists' item categories (SimGR's Entropy@K). With `per_user`, it also
    keeps every user's Recall@K and NDCG@K for paired tests (`per_user_results`).
    """

    def __init__(
        self,
        num_items: int,
        ks=KS,
        device: torch.device | str = "cpu",
        per_user: bool = False,
        categories: torch.Tensor | None = None,
    ):
        self.num_items, self.ks, self.categories = num_items, tuple(ks), categories
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = torch.zeros(len(self.ks), num_items, dtype=torch.float64, device=device)
        self.rows: list[dict[str, torch.Tensor]] | None = [] if per_user else None
        self.item_sizes: dict[str, int] = {}  # items of each item group (`update_items`)

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
        groups: dict[str, torch.Tensor | None] = {"": None}
        if warm is not None:
            groups.update({"warm_users/": warm, "cold_users/": ~warm})
        for prefix, mask in groups.items():
            self._add(prefix, per_user, mask)
        for row, k in enumerate(self.ks):
            top = ranked[:, :k].flatten()
            self.counts[row].index_add_(0, top.clamp(min=0), (top >= 0).to(self.counts.dtype))

    def _add(self, prefix: str, per_user: dict[str, torch.Tensor], mask: torch.Tensor | None):
        weight = None if mask is None else mask.double()
        for name, values in per_user.items():
            values = values.double()
            total = (values if weight is None else values * weight).sum()
            self.sums[prefix + name] = self.sums.get(prefix + name, 0.0) + total

    def update_items(
        self,
        prefix: str,
        ranked: torch.Tensor,
        target: torch.Tensor,
        users: torch.Tensor,
        items: int,
    ) -> None:
        """Add a batch to the item group `prefix` (`warm_items/`, `cold_items/`) of `items`
        items: `ranked [B, >=max(ks)]` ranks only the group's items (the others' scores masked
        out, as SETRec's code sets them to -1e16) and counts for the `users [B]` (bool) whose
        target is in the group."""
        per_user = rank_metrics(ranked, target, self.ks)
        per_user["users"] = torch.ones_like(target, dtype=torch.float64)
        self._add(prefix, per_user, users)
        self.item_sizes[prefix] = items

    def reduce(self, fn) -> None:
        """Replace every total by `fn(total)`, e.g. a sum across processes."""
        self.sums = {name: fn(self.sums[name]) for name in sorted(self.sums)}
        self.counts = fn(self.counts)

    def results(self) -> dict[str, float]:
        """Mean metrics per group (groups without users are left out), user counts of the warm
        and cold groups, item counts and random-ranking baselines of the item groups,
        random-ranking baselines of the whole catalogue, coverage@K, item_entropy@K and (with
        categories) category_entropy@K."""
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
        for prefix, items in self.item_sizes.items():
            out[prefix + "items"] = float(items)
            if items:
                out.update({prefix + n: v for n, v in random_metrics(items, self.ks).items()})
        out.update(random_metrics(self.num_items, self.ks))
        for row, k in enumerate(self.ks):
            counts = self.counts[row]
            out[f"coverage@{k}"] = float((counts > 0).sum()) / self.num_items
            out[f"item_entropy@{k}"] = entropy(counts)
            if self.categories is not None:
                out[f"category_entropy@{k}"] = entropy(counts @ self.categories.to(counts))
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
