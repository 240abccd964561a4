"""R-VQ: residual vector quantisation whose codebooks are trained by gradient descent."""

from __future__ import annotations

import faiss
import numpy as np
import torch

from grid.errors import GridError
from grid.tokenizers.balanced import squared_distances
from grid.tokenizers.base import Tokenizer, check_embeddings, single_threaded


def kmeans(data: np.ndarray, k: int, seed: int, niter: int = 10) -> np.ndarray:
    """`k` faiss k-means centroids of `data` (float32 `[k, dim]`)."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    km = faiss.Kmeans(
        data.shape[1],
        k,
        niter=niter,
        seed=seed,
        max_points_per_centroid=256,
        min_points_per_centroid=1,
    )
    with single_threaded():
        km.train(data)
    return km.centroids.copy()


def nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword (squared L2) for each row of `z`."""
    d = (z * z).sum(1, keepdim=True) - 2 * z @ codebook.T + (codebook * codebook).sum(1)
    return d.argmin(1)


def check_codebook(codebook_size: int, num_items: int) -> None:
    if not 1 <= codebook_size <= num_items:
        raise GridError(
            f"tokenizer.codebook_size={codebook_size} must lie in [1, {num_items}] (the number "
            f"of items); lower codebook_size"
        )


def _unit(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(r, axis=1, keepdims=True)
    return r / np.maximum(norms, 1e-12), norms


class ResidualVQ(Tokenizer):
    """`levels` codebooks of `codebook_size` codes, trained level by level with Adam.

    Each level starts from k-means, then minimises the quantisation error of its (optionally
    L2-normalised) residuals; codes unused in an epoch restart from random live residuals.
    With `normalize_residuals`, `reconstruct` rescales each level by the mean residual norm seen
    in training. `loss_history_[level]` holds the level's mean squared error per epoch (0: init).
    """

    collision_strategies = ("dedup", "random", "balanced")

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        epochs: int = 10,
        batch_size: int = 512,
        lr: float = 1e-3,
        normalize_residuals: bool = True,
        kmeans_iters: int = 10,
        seed: int = 0,
    ):
        self.levels, self.codebook_size, self.epochs = levels, codebook_size, epochs
        self.batch_size, self.lr, self.normalize_residuals = batch_size, lr, normalize_residuals
        self.kmeans_iters, self.seed = kmeans_iters, seed
        self.codebooks_: list[np.ndarray] = []
        self.scales_: list[float] = []
        self.loss_history_: list[list[float]] = []

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.levels

    def _train_level(self, r: np.ndarray, level: int) -> np.ndarray:
        gen = torch.Generator().manual_seed(self.seed * 1000 + level)
        data = torch.from_numpy(r)
        codebook = torch.nn.Parameter(
            torch.from_numpy(kmeans(r, self.codebook_size, self.seed + level, self.kmeans_iters))
        )
        opt = torch.optim.Adam([codebook], lr=self.lr)

        def mse() -> float:
            with torch.no_grad():
                return float(((data - codebook[nearest(data, codebook)]) ** 2).sum(1).mean())

        history = [mse()]
        for _ in range(self.epochs):
            counts = torch.zeros(self.codebook_size, dtype=torch.long)
            for batch in torch.randperm(len(data), generator=gen).split(self.batch_size):
                x = data[batch]
                idx = nearest(x, codebook.detach())
                loss = ((x - codebook[idx]) ** 2).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                counts += torch.bincount(idx, minlength=self.codebook_size)
            dead = torch.nonzero(counts == 0).flatten()
            if len(dead):
                with torch.no_grad():
                    codebook[dead] = data[torch.randint(len(data), (len(dead),), generator=gen)]
            history.append(mse())
        self.loss_history_.append(history)
        return codebook.detach().numpy().copy()

    def fit(self, X: np.ndarray) -> ResidualVQ:
        X = check_embeddings(X)
        check_codebook(self.codebook_size, len(X))
        self.dim_, self.codebooks_, self.scales_, self.loss_history_ = X.shape[1], [], [], []
        residual, scale = X.copy(), 1.0
        with torch.random.fork_rng(), single_threaded():
            torch.manual_seed(self.seed)
            for level in range(self.levels):
                if self.normalize_residuals:
                    residual, norms = _unit(residual)
                    scale *= float(norms.mean())
                self.scales_.append(scale)
                codebook = self._train_level(residual, level)
                self.codebooks_.append(codebook)
                codes = nearest(torch.from_numpy(residual), torch.from_numpy(codebook)).numpy()
                residual = residual - codebook[codes]
        return self

    def _residuals(self, X: np.ndarray, codes: np.ndarray | None, stop: int):
        """Residual entering level `stop`; with codes None also encodes levels before it."""
        residual = X.copy()
        out = np.empty((len(X), stop), dtype=np.int64)
        for level in range(stop):
            if self.normalize_residuals:
                residual = _unit(residual)[0]
            c = self.codebooks_[level]
            if codes is None:
                out[:, level] = nearest(torch.from_numpy(residual), torch.from_numpy(c)).numpy()
            else:
                out[:, level] = codes[:, level]
            residual = residual - c[out[:, level]]
        if self.normalize_residuals:
            residual = _unit(residual)[0]
        return residual, out

    def encode(self, X: np.ndarray) -> np.ndarray:
        return self._residuals(self._check_fitted(X), None, self.levels)[1]

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        return sum(
            s * c[codes[:, lv]]
            for lv, (s, c) in enumerate(zip(self.scales_, self.codebooks_, strict=True))
        )

    def _last_level_cost(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        residual, _ = self._residuals(X, codes, self.levels - 1)
        return squared_distances(residual, self.codebooks_[-1])
