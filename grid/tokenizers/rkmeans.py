"""RK-Means: residual k-means, one faiss k-means per level on what earlier levels left over."""

from __future__ import annotations

import faiss
import numpy as np

from grid.errors import GridError
from grid.tokenizers.balanced import squared_distances
from grid.tokenizers.base import Tokenizer, check_embeddings


def _nearest(centroids: np.ndarray, X: np.ndarray) -> np.ndarray:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    return index.search(X, 1)[1][:, 0].astype(np.int64)


def _count_distinct(X: np.ndarray, at_least: int) -> int:
    """Distinct rows of X, counted over a prefix first: exact whenever it is below `at_least`."""
    rows = np.ascontiguousarray(X).view(np.dtype((np.void, X.dtype.itemsize * X.shape[1])))
    head = len(np.unique(rows[: 4 * at_least]))
    return head if head >= at_least else len(np.unique(rows))


def _normalize(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


class ResidualKMeans(Tokenizer):
    """`levels` codebooks of `codebook_size` centroids; level l clusters the level-(l-1) residuals.

    With `normalize_residuals` every level clusters L2-normalised residuals (as in the GRID
    paper's option); codes then capture directions and `reconstruct` is no longer exact.
    """

    collision_strategies = ("dedup", "random", "balanced")

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        niter: int = 20,
        normalize_residuals: bool = False,
        seed: int = 0,
    ):
        self.levels, self.codebook_size, self.niter = levels, codebook_size, niter
        self.normalize_residuals, self.seed = normalize_residuals, seed
        self.codebooks_: list[np.ndarray] = []

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.levels

    def fit(self, X: np.ndarray) -> ResidualKMeans:
        X = check_embeddings(X)
        self.dim_, self.codebooks_ = X.shape[1], []
        residual = X.copy()
        for level in range(self.levels):
            if self.normalize_residuals:
                residual = _normalize(residual)
            if not residual.any():  # already reconstructed exactly: nothing left to cluster
                centroids = np.zeros((self.codebook_size, self.dim_), dtype=np.float32)
            else:
                distinct = _count_distinct(residual, at_least=self.codebook_size)
                if self.codebook_size > distinct:
                    raise GridError(
                        f"tokenizer.codebook_size={self.codebook_size} exceeds the {distinct} "
                        f"distinct residuals at level {level}; lower codebook_size or levels"
                    )
                km = faiss.Kmeans(
                    self.dim_,
                    self.codebook_size,
                    niter=self.niter,
                    seed=self.seed + level,
                    max_points_per_centroid=256,
                )
                km.train(residual)
                centroids = km.centroids.copy()
            self.codebooks_.append(centroids)
            residual = residual - centroids[_nearest(centroids, residual)]
        return self

    def encode(self, X: np.ndarray) -> np.ndarray:
        residual = self._check_fitted(X).copy()
        codes = np.empty((len(residual), self.levels), dtype=np.int64)
        for level, centroids in enumerate(self.codebooks_):
            if self.normalize_residuals:
                residual = _normalize(residual)
            codes[:, level] = _nearest(centroids, residual)
            residual = residual - centroids[codes[:, level]]
        return codes

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        return sum(c[codes[:, level]] for level, c in enumerate(self.codebooks_))

    def _last_level_cost(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        residual = X.copy()
        for level, centroids in enumerate(self.codebooks_[:-1]):
            if self.normalize_residuals:
                residual = _normalize(residual)
            residual = residual - centroids[codes[:, level]]
        if self.normalize_residuals:
            residual = _normalize(residual)
        return squared_distances(residual, self.codebooks_[-1])
