"""The balanced collision strategy: re-pick last-level codes under a capacity of one per prefix."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.optimize import linear_sum_assignment

from grid.errors import GridError


def balance_last_level(
    codes: np.ndarray, vocab_size: int, cost: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """Codes whose last position is re-assigned so no two items share a full code tuple.

    Within each prefix group (items sharing every code but the last) that has a collision, the
    last codes solve a min-cost assignment with capacity one per code; `cost(items)` gives the
    `[len(items), vocab_size]` squared distances of those items to the last-level codebook.
    Items in collision-free groups keep their codes, so the result is the optimal
    collision-free last level given the prefixes.
    """
    codes = np.array(codes, dtype=np.int64)
    _, prefix, prefix_sizes = np.unique(
        codes[:, :-1], axis=0, return_inverse=True, return_counts=True
    )
    prefix = prefix.reshape(-1)
    _, full, full_sizes = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    collided = np.unique(prefix[full_sizes[full.reshape(-1)] > 1])
    if len(collided) == 0:
        return codes
    too_big = prefix_sizes[collided] > vocab_size
    if too_big.any():
        raise GridError(
            f"{int(prefix_sizes[collided].max())} items share one code prefix but the last level "
            f"has only {vocab_size} codes; use collisions=dedup or a larger codebook_size"
        )
    items = np.flatnonzero(np.isin(prefix, collided))
    items = items[np.argsort(prefix[items], kind="stable")]
    costs = np.asarray(cost(items), dtype=np.float64)
    bounds = np.r_[0, np.flatnonzero(np.diff(prefix[items])) + 1, len(items)]
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        rows, cols = linear_sum_assignment(costs[start:stop])
        codes[items[start + rows], -1] = cols
    return codes


def squared_distances(X: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """`[len(X), len(centroids)]` squared L2 distances."""
    X = X.astype(np.float64)
    C = centroids.astype(np.float64)
    return (X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
