"""Collaborative item embeddings from training interactions: BPR-MF, LightGCN or SASRec's table."""

from __future__ import annotations

import lightning as L
import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from grid.data import (
    BucketLoader,
    Dataset,
    LengthBucketSampler,
    SequenceSamples,
    Split,
    training_samples,
)
from grid.encoders.base import Encoder
from grid.errors import GridError
from grid.generators.sasrec import SASRec

# Per-method training defaults, used where the constructor argument is left as None.
DEFAULTS = {
    "mf": dict(epochs=40, lr=1e-2, batch_size=8192, reg=1e-3),
    "lightgcn": dict(epochs=10, lr=1e-2, batch_size=8192, reg=1e-4),
    "sasrec": dict(epochs=1, lr=1e-3, batch_size=256, reg=0.0),
}


def interactions(train: list[np.ndarray], num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs of the training sequences, sorted by user then item."""
    users = np.repeat(np.arange(len(train), dtype=np.int64), [len(s) for s in train])
    pairs = np.unique(users * num_items + np.concatenate(train).astype(np.int64))
    return pairs // num_items, pairs % num_items


def normalized_adjacency(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> sp.csr_matrix:
    """D^-1/2 A D^-1/2 of the bipartite user-item graph, users first (symmetric, float32)."""
    rows = np.concatenate([users, num_users + items])
    cols = np.concatenate([num_users + items, users])
    degree = np.bincount(rows, minlength=num_users + num_items).astype(np.float64)
    values = (1.0 / np.sqrt(degree[rows] * degree[cols])).astype(np.float32)
    n = num_users + num_items
    return sp.csr_matrix((values, (rows, cols)), shape=(n, n))


class _LightGCN(torch.autograd.Function):
    """Mean of `adj^k @ x` for k = 0..layers, with `adj` a symmetric scipy matrix.

    The operator is symmetric, so its backward applies it again. scipy's CSR product is several
    times faster on CPU than torch.sparse here.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, adj: sp.csr_matrix, layers: int) -> torch.Tensor:
        ctx.adj, ctx.layers = adj, layers
        return torch.from_numpy(_lightgcn(adj, x.detach().numpy(), layers))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return torch.from_numpy(_lightgcn(ctx.adj, grad.numpy(), ctx.layers)), None, None


def _lightgcn(adj: sp.csr_matrix, x: np.ndarray, layers: int) -> np.ndarray:
    out, h = x.copy(), x
    for _ in range(layers):
        h = adj @ h
        out += h
    out /= layers + 1
    return out


class CollaborativeEncoder(Encoder):
    """Item embeddings learned from `split.train` only, by `method` `mf`, `lightgcn` or `sasrec`.

    Training arguments left as None take the method's `DEFAULTS`. Items absent from training get
    small deterministic vectors (see `_fill_unseen`).
    """

    def __init__(
        self,
        method: str = "lightgcn",
        dim: int = 64,
        epochs: int | None = None,
        lr: float | None = None,
        batch_size: int | None = None,
        reg: float | None = None,
        layers: int = 2,
        blocks: int = 2,
        heads: int = 1,
        dropout: float = 0.3,
        max_history: int = 20,
        seed: int = 0,
    ):
        if method not in DEFAULTS:
            raise GridError(f"unknown encoder.method {method!r}; choose one of {sorted(DEFAULTS)}")
        defaults = DEFAULTS[method]
        self.method, self.dim, self.layers = method, dim, layers
        self.epochs = defaults["epochs"] if epochs is None else epochs
        self.lr = defaults["lr"] if lr is None else lr
        self.batch_size = defaults["batch_size"] if batch_size is None else batch_size
        self.reg = defaults["reg"] if reg is None else reg  # L2 on BPR rows; SASRec weight decay
        self.blocks, self.heads, self.dropout = blocks, heads, dropout
        self.max_history, self.seed = max_history, seed

    def encode(self, dataset: Dataset, split: Split) -> np.ndarray:
        train = split.train
        if len(train) != dataset.num_users:
            raise GridError(
                f"split has {len(train)} training sequences but the dataset {dataset.num_users} "
                f"users; build the split from this dataset"
            )
        if self.method == "sasrec":
            emb = self._sasrec(train, dataset.num_items)
        else:
            users, items = interactions(train, dataset.num_items)
            emb = self._bpr(users, items, len(train), dataset.num_items)
        seen = np.bincount(np.concatenate(train), minlength=dataset.num_items) > 0
        return self._fill_unseen(emb.astype(np.float32), seen)

    def _fill_unseen(self, emb: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Give unseen items seeded Gaussian vectors of 1% of the median seen-item norm.

        Distinct vectors near the origin: they stay apart from trained items and from each other,
        so tokenizers need not collide them.
        """
        if seen.all():
            return emb
        if not seen.any():
            raise GridError("no training interactions: collaborative embeddings need some")
        scale = 0.01 * float(np.median(np.linalg.norm(emb[seen], axis=1))) / np.sqrt(self.dim)
        noise = np.random.default_rng(self.seed).standard_normal((int((~seen).sum()), self.dim))
        emb = emb.copy()
        emb[~seen] = (scale * noise).astype(np.float32)
        return emb

    def _bpr(self, users: np.ndarray, items: np.ndarray, num_users: int, num_items: int):
        """BPR with one uniform negative per positive; LightGCN propagates before scoring."""
        g = torch.Generator().manual_seed(self.seed)
        ego = torch.nn.Parameter(0.1 * torch.randn(num_users + num_items, self.dim, generator=g))
        adj = None
        if self.method == "lightgcn":
            adj = normalized_adjacency(users, items, num_users, num_items)
        users, items = torch.as_tensor(users), torch.as_tensor(items) + num_users
        opt = torch.optim.Adam([ego], lr=self.lr, fused=True)
        for _ in range(self.epochs):
            order = torch.randperm(len(users), generator=g)
            for start in range(0, len(order), self.batch_size):
                b = order[start : start + self.batch_size]
                # Uniform negatives may hit a positive now and then; at catalogue scale it is rare.
                j = num_users + torch.randint(num_items, (len(b),), generator=g)
                idx = torch.cat([users[b], items[b], j])
                # F.embedding rather than indexing: its CPU backward is deterministic.
                rows = final = F.embedding(idx, ego)
                if adj is not None:
                    final = F.embedding(idx, _LightGCN.apply(ego, adj, self.layers))
                eu, ei, ej = final.view(3, len(b), self.dim)
                margin = (eu * (ei - ej)).sum(1)
                loss = -F.logsigmoid(margin).mean() + self.reg * rows.square().sum() / (2 * len(b))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if adj is None:
            return ego.detach()[num_users:].numpy()
        return _lightgcn(adj, ego.detach().numpy(), self.layers)[num_users:]

    def _sasrec(self, train: list[np.ndarray], num_items: int) -> np.ndarray:
        """Train SASRec on sliding-window training samples; return its item embedding table."""
        data = SequenceSamples(*training_samples(train, self.max_history))
        sampler = LengthBucketSampler(data.lengths, self.batch_size, shuffle=True, seed=self.seed)
        loader = BucketLoader(data, sampler)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = SASRec(
                num_items,
                hidden=self.dim,
                blocks=self.blocks,
                heads=self.heads,
                dropout=self.dropout,
                max_history=self.max_history,
                lr=self.lr,
                weight_decay=self.reg,
            )
            trainer = L.Trainer(
                max_epochs=self.epochs,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
            trainer.fit(model, loader)
        return model.item_embeddings().detach().cpu().numpy()
