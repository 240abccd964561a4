"""R-VQ: residual vector quantisation whose codebooks are learned by gradient descent (GRID)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import kmeans_plusplus

from grid.errors import GridError
from grid.tokenizers.balanced import squared_distances
from grid.tokenizers.base import Tokenizer, check_embeddings, single_threaded


def nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword (squared L2) for each row of `z`."""
    # ||c||^2 - 2 z.c: the squared distance less ||z||^2, which does not change the argmin
    return torch.addmm((codebook * codebook).sum(1), z, codebook.T, alpha=-2).argmin(1)


def check_codebook(codebook_size: int, num_items: int) -> None:
    if not 1 <= codebook_size <= num_items:
        raise GridError(
            f"tokenizer.codebook_size={codebook_size} must lie in [1, {num_items}] (the number "
            f"of items); lower codebook_size"
        )


def _unit(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(r, axis=1, keepdims=True)
    return r / np.maximum(norms, 1e-12), norms


def _batches(n: int, size: int, gen: torch.Generator):
    """Endless shuffled mini-batches of row indices, reshuffled at every pass over the data."""
    while True:
        yield from torch.randperm(n, generator=gen).split(size)


class ResidualVQ(Tokenizer):
    """`levels` codebooks of `codebook_size` codes, learned one level after the other by Adagrad.

    GRID's R-VQ: level l quantises the (L2-normalised) residual that levels < l leave. Its
    codebook starts from k-means++ seeds (plain D^2 sampling, no Lloyd iterations) among
    `init_items` of those residuals, then takes `steps` Adagrad steps on the codebook loss
    sum ||sg(r) - c[nearest(r)]||^2 over shuffled batches while earlier levels stay frozen; codes
    nobody picks keep their seed. With `normalize_residuals`, `reconstruct` rescales each level
    by the mean residual norm seen in training. `loss_history_[level]` holds the level's mean
    squared error over the fitted items after each tenth of its steps (0: the seeds).
    """

    collision_strategies = ("dedup", "random", "balanced")

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        steps: int = 1000,
        batch_size: int = 2048,
        lr: float = 1e-3,
        init_items: int = 3072,
        normalize_residuals: bool = True,
        seed: int = 0,
    ):
        self.levels, self.codebook_size, self.steps = levels, codebook_size, steps
        self.batch_size, self.lr, self.init_items = batch_size, lr, init_items
        self.normalize_residuals, self.seed = normalize_residuals, seed
        self.codebooks_: list[np.ndarray] = []
        self.scales_: list[float] = []
        self.loss_history_: list[list[float]] = []

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.levels

    def _seeds(self, r: np.ndarray, level: int) -> np.ndarray:
        """k-means++ seeds among a random sample of `init_items` (>= codebook_size) residuals."""
        rng = np.random.default_rng([self.seed, level])
        size = min(len(r), max(self.init_items, self.codebook_size))
        sample = r[np.sort(rng.choice(len(r), size, replace=False))]
        seeds, _ = kmeans_plusplus(
            sample, self.codebook_size, random_state=int(rng.integers(2**31)), n_local_trials=1
        )
        return np.ascontiguousarray(seeds, dtype=np.float32)

    def _train_level(self, r: np.ndarray, level: int) -> np.ndarray:
        data = torch.from_numpy(r)
        codebook = torch.nn.Parameter(torch.from_numpy(self._seeds(r, level)))
        opt = torch.optim.Adagrad([codebook], lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed * 1000 + level)
        batches = _batches(len(data), self.batch_size, gen)
        checkpoints = set(np.linspace(0, self.steps, 11).round().astype(int).tolist())

        def mse() -> float:
            with torch.no_grad():
                return float(((data - codebook[nearest(data, codebook)]) ** 2).sum(1).mean())

        history = [mse()]
        for step in range(1, self.steps + 1):
            x = data[next(batches)]
            with torch.no_grad():
                idx = nearest(x, codebook)
                counts = torch.bincount(idx, minlength=self.codebook_size).to(x.dtype)
                sums = torch.zeros_like(codebook).index_add_(0, idx, x)
            # sum_i ||x_i - c[idx_i]||^2 less its constant sum_i ||x_i||^2, summed per codeword
            # (same gradient, cheaper backward); the commitment term has no trainable input
            loss = (counts * (codebook * codebook).sum(1)).sum() - 2 * (codebook * sums).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step in checkpoints:
                history.append(mse())
        self.loss_history_.append(history)
        return codebook.detach().numpy().copy()

    def fit(self, X: np.ndarray) -> ResidualVQ:
        X = check_embeddings(X)
        check_codebook(self.codebook_size, len(X))
        for name, low in (("steps", 0), ("batch_size", 1), ("init_items", 1)):
            if getattr(self, name) < low:
                raise GridError(f"tokenizer.{name}={getattr(self, name)} must be at least {low}")
        self.dim_, self.codebooks_, self.scales_, self.loss_history_ = X.shape[1], [], [], []
        residual, scale = X.copy(), 1.0
        with single_threaded():
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
