"""RQ-VAE: an MLP autoencoder whose latent is residual-quantised (TIGER's tokenizer)."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from torch import nn

from grid.errors import GridError
from grid.tokenizers.balanced import squared_distances
from grid.tokenizers.base import Tokenizer, check_embeddings, single_threaded
from grid.tokenizers.rvq import check_codebook, nearest


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


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of the given widths with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Standardizer:
    """Per-dimension whitening (zero mean, unit variance), or the identity."""

    def __init__(self, X: np.ndarray, enabled: bool):
        self.mean = X.mean(0) if enabled else np.zeros(X.shape[1], np.float32)
        self.std = np.maximum(X.std(0), 1e-6) if enabled else np.ones(X.shape[1], np.float32)

    def __call__(self, X: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((X - self.mean) / self.std).astype(np.float32))

    def inverse(self, Z: torch.Tensor) -> np.ndarray:
        return (Z.detach().numpy() * self.std + self.mean).astype(np.float32)


class RQVAE(Tokenizer):
    """Encoder `hidden` -> `latent_dim`, `levels` x `codebook_size` residual quantiser, decoder.

    Trained with reconstruction + codebook + `beta` x commitment losses and straight-through
    gradients; codebooks start from k-means on the first epoch's latents (all items up to
    `init_items`), and codes unused in an epoch restart from random live residuals.
    `recon_history_` holds the relative reconstruction error per epoch (0: after init).
    """

    collision_strategies = ("dedup", "random", "balanced")

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        hidden: tuple[int, ...] = (512, 256, 128),
        latent_dim: int = 32,
        epochs: int = 20,
        batch_size: int = 256,
        lr: float = 1e-3,
        beta: float = 0.25,
        whiten: bool = True,
        init_items: int = 20000,
        seed: int = 0,
    ):
        self.levels, self.codebook_size, self.hidden = levels, codebook_size, tuple(hidden)
        self.latent_dim, self.epochs, self.batch_size, self.lr = latent_dim, epochs, batch_size, lr
        self.beta, self.whiten, self.init_items, self.seed = beta, whiten, init_items, seed
        self.recon_history_: list[float] = []

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.levels

    def _quantize(self, z: torch.Tensor):
        """Codes, summed codewords and the codebook/commitment losses of latents `z`."""
        residual, total = z, torch.zeros_like(z)
        codes, cb_loss, commit = [], z.new_zeros(()), z.new_zeros(())
        for codebook in self.codebooks_:
            idx = nearest(residual.detach(), codebook.detach())
            q = codebook[idx]
            cb_loss = cb_loss + ((q - residual.detach()) ** 2).sum(1).mean()
            commit = commit + ((residual - q.detach()) ** 2).sum(1).mean()
            total = total + q
            residual = residual - q.detach()
            codes.append(idx)
        return torch.stack(codes, 1) if codes else None, total, residual, cb_loss, commit

    def _losses(self, x: torch.Tensor):
        """Codes and the reconstruction, codebook and commitment losses of a batch."""
        z = self.encoder_(x)
        codes, total, _, cb_loss, commit = self._quantize(z)
        x_hat = self.decoder_(z + (total - z).detach())  # straight-through to the encoder
        return codes, ((x_hat - x) ** 2).sum(1).mean(), cb_loss, commit

    def _init_codebooks(self, data: torch.Tensor, gen: torch.Generator) -> None:
        sample = data[torch.randperm(len(data), generator=gen)[: self.init_items]]
        with torch.no_grad():
            residual = self.encoder_(sample)
            for level, codebook in enumerate(self.codebooks_):
                c = kmeans(residual.numpy(), self.codebook_size, self.seed + level)
                codebook.copy_(torch.from_numpy(c))
                residual = residual - codebook[nearest(residual, codebook)]

    def _restart_dead(self, data: torch.Tensor, counts: torch.Tensor, gen) -> None:
        sample = data[torch.randperm(len(data), generator=gen)[: 4 * self.codebook_size]]
        with torch.no_grad():
            residual = self.encoder_(sample)
            for level, codebook in enumerate(self.codebooks_):
                dead = torch.nonzero(counts[level] == 0).flatten()
                if len(dead):
                    pick = torch.randint(len(residual), (len(dead),), generator=gen)
                    codebook[dead] = residual[pick]
                residual = residual - codebook[nearest(residual, codebook)]

    def _relative_error(self, data: torch.Tensor) -> float:
        with torch.no_grad():
            _, total, *_ = self._quantize(self.encoder_(data))
            return float(torch.linalg.norm(self.decoder_(total) - data) / torch.linalg.norm(data))

    def fit(self, X: np.ndarray) -> RQVAE:
        X = check_embeddings(X)
        check_codebook(self.codebook_size, len(X))
        if self.latent_dim < 1 or self.levels < 1:
            raise GridError("tokenizer.latent_dim and tokenizer.levels must be positive")
        self.dim_, self.scaler_ = X.shape[1], Standardizer(X, self.whiten)
        data = self.scaler_(X)
        with torch.random.fork_rng(), single_threaded():
            torch.manual_seed(self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            self.encoder_ = mlp([self.dim_, *self.hidden, self.latent_dim])
            self.decoder_ = mlp([self.latent_dim, *reversed(self.hidden), self.dim_])
            self.codebooks_ = nn.ParameterList(
                nn.Parameter(torch.zeros(self.codebook_size, self.latent_dim))
                for _ in range(self.levels)
            )
            self._init_codebooks(data, gen)
            params = [*self.encoder_.parameters(), *self.decoder_.parameters(), *self.codebooks_]
            opt = torch.optim.Adam(params, lr=self.lr)
            self.recon_history_ = [self._relative_error(data)]
            for epoch in range(self.epochs):
                counts = torch.zeros(self.levels, self.codebook_size, dtype=torch.long)
                for batch in torch.randperm(len(data), generator=gen).split(self.batch_size):
                    codes, recon, cb_loss, commit = self._losses(data[batch])
                    loss = recon + cb_loss + self.beta * commit
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    for level in range(self.levels):
                        counts[level] += torch.bincount(
                            codes[:, level], minlength=self.codebook_size
                        )
                if epoch < self.epochs - 1:
                    self._restart_dead(data, counts, gen)
                self.recon_history_.append(self._relative_error(data))
        return self

    def encode(self, X: np.ndarray) -> np.ndarray:
        X = self._check_fitted(X)
        data = self.scaler_(X)
        with torch.no_grad():
            return self._quantize(self.encoder_(data))[0].numpy().astype(np.int64)

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        with torch.no_grad():
            total = sum(c[codes[:, lv]] for lv, c in enumerate(self.codebooks_))
            return self.scaler_.inverse(self.decoder_(total))

    def _last_level_cost(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            residual = self.encoder_(self.scaler_(X))
            for level, codebook in enumerate(self.codebooks_[:-1]):
                residual = residual - codebook[torch.as_tensor(codes[:, level])]
            return squared_distances(residual.numpy(), self.codebooks_[-1].detach().numpy())
