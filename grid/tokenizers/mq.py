"""MQ-Tokenizer (TokenRec): parallel masked encoders, one codebook each, an averaging decoder."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from grid.tokenizers.balanced import squared_distances
from grid.tokenizers.base import Tokenizer, check_embeddings, single_threaded
from grid.tokenizers.rqvae import Standardizer, kmeans, mlp
from grid.tokenizers.rvq import check_codebook, nearest


class MQTokenizer(Tokenizer):
    """`levels` (K) MLP encoders over a Bernoulli-masked input, each with `codebook_size` (L) codes.

    The decoder averages the K selected codewords and reconstructs the unmasked input. The mask
    drops `mask_ratio` of the entries (rescaling the rest, as dropout does), redrawn every epoch;
    every `reinit_every` epochs unused codewords restart at k-means centroids of the worst-
    quantised latents. `recon_history_` holds the relative reconstruction error per epoch.
    """

    collision_strategies = ("dedup", "random", "balanced")

    def __init__(
        self,
        levels: int = 3,
        codebook_size: int = 256,
        hidden: int = 256,
        latent_dim: int = 64,
        mask_ratio: float = 0.2,
        epochs: int = 20,
        batch_size: int = 256,
        lr: float = 1e-3,
        beta: float = 0.25,
        reinit_every: int = 1,
        whiten: bool = True,
        seed: int = 0,
    ):
        self.levels, self.codebook_size, self.hidden = levels, codebook_size, hidden
        self.latent_dim, self.mask_ratio, self.epochs = latent_dim, mask_ratio, epochs
        self.batch_size, self.lr, self.beta = batch_size, lr, beta
        self.reinit_every, self.whiten, self.seed = reinit_every, whiten, seed
        self.recon_history_: list[float] = []

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.levels

    def _latents(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [encoder(x) for encoder in self.encoders_]

    def _forward(self, x_in: torch.Tensor):
        zs = self._latents(x_in)
        codes, cb_loss, commit, selected = [], x_in.new_zeros(()), x_in.new_zeros(()), []
        for z, codebook in zip(zs, self.codebooks_, strict=True):
            idx = nearest(z.detach(), codebook.detach())
            q = codebook[idx]
            cb_loss = cb_loss + ((q - z.detach()) ** 2).sum(1).mean()
            commit = commit + ((z - q.detach()) ** 2).sum(1).mean()
            selected.append(z + (q - z).detach())  # straight-through to each encoder
            codes.append(idx)
        x_hat = self.decoder_(torch.stack(selected).mean(0))
        return torch.stack(codes, 1), x_hat, cb_loss, commit

    def _reinit_unused(self, data: torch.Tensor, counts: torch.Tensor, round_: int) -> None:
        with torch.no_grad():
            for k, (z, codebook) in enumerate(
                zip(self._latents(data), self.codebooks_, strict=True)
            ):
                dead = torch.nonzero(counts[k] == 0).flatten()
                if len(dead) == 0:
                    continue
                err = ((z - codebook[nearest(z, codebook)]) ** 2).sum(1)
                worst = z[err >= err.median()]
                k_new = min(len(dead), len(worst))
                centroids = kmeans(worst.numpy(), k_new, self.seed + 1000 * round_ + k)
                codebook[dead[:k_new]] = torch.from_numpy(centroids)

    def _relative_error(self, data: torch.Tensor) -> float:
        with torch.no_grad():
            x_hat = self._forward(data)[1]
            return float(torch.linalg.norm(x_hat - data) / torch.linalg.norm(data))

    def fit(self, X: np.ndarray) -> MQTokenizer:
        X = check_embeddings(X)
        check_codebook(self.codebook_size, len(X))
        self.dim_, self.scaler_ = X.shape[1], Standardizer(X, self.whiten)
        data = self.scaler_(X)
        with torch.random.fork_rng(), single_threaded():
            torch.manual_seed(self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            self.encoders_ = nn.ModuleList(
                mlp([self.dim_, self.hidden, self.latent_dim]) for _ in range(self.levels)
            )
            self.decoder_ = mlp([self.latent_dim, self.hidden, self.dim_])
            with torch.no_grad():
                self.codebooks_ = nn.ParameterList(
                    nn.Parameter(
                        torch.from_numpy(kmeans(z.numpy(), self.codebook_size, self.seed + k))
                    )
                    for k, z in enumerate(self._latents(data))
                )
            params = [*self.encoders_.parameters(), *self.decoder_.parameters(), *self.codebooks_]
            opt = torch.optim.Adam(params, lr=self.lr)
            self.recon_history_ = [self._relative_error(data)]
            counts = torch.zeros(self.levels, self.codebook_size, dtype=torch.long)
            keep = 1.0 - self.mask_ratio
            for epoch in range(self.epochs):
                mask = (torch.rand(data.shape, generator=gen) < keep).float() / keep
                for batch in torch.randperm(len(data), generator=gen).split(self.batch_size):
                    x = data[batch]
                    codes, x_hat, cb_loss, commit = self._forward(x * mask[batch])
                    loss = ((x_hat - x) ** 2).sum(1).mean() + cb_loss + self.beta * commit
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    for k in range(self.levels):
                        counts[k] += torch.bincount(codes[:, k], minlength=self.codebook_size)
                if (epoch + 1) % self.reinit_every == 0 and epoch < self.epochs - 1:
                    self._reinit_unused(data, counts, epoch)
                    counts.zero_()
                self.recon_history_.append(self._relative_error(data))
        return self

    def encode(self, X: np.ndarray) -> np.ndarray:
        X = self._check_fitted(X)
        data = self.scaler_(X)
        with torch.no_grad():
            return self._forward(data)[0].numpy().astype(np.int64)

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        with torch.no_grad():
            mean = torch.stack([c[codes[:, k]] for k, c in enumerate(self.codebooks_)]).mean(0)
            return self.scaler_.inverse(self.decoder_(mean))

    def _last_level_cost(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            z = self.encoders_[-1](self.scaler_(X))
            return squared_distances(z.numpy(), self.codebooks_[-1].detach().numpy())
