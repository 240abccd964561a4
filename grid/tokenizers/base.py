"""The tokenizer interface: item embeddings in, discrete codes out (scikit-learn style)."""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
import torch

from grid.config import check_fields
from grid.errors import GridError


def check_embeddings(X: np.ndarray, dim: int | None = None) -> np.ndarray:
    """Validate a 2-D finite float matrix (optionally of a given width); return it as float32."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise GridError(f"expected a non-empty [items, dim] embedding matrix, got shape {X.shape}")
    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        raise GridError(
            f"{bad} embeddings contain NaN or infinite values; fix the encoder output "
            f"(or clear its cache) before tokenizing"
        )
    if dim is not None and X.shape[1] != dim:
        raise GridError(
            f"embeddings have dimension {X.shape[1]} but the tokenizer was fitted on {dim}; "
            f"refit it on these embeddings or use the encoder it was fitted with"
        )
    return np.ascontiguousarray(X, dtype=np.float32)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run faiss and torch on one thread: small ops lose more to thread sync than they gain."""
    before = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before[0])
        torch.set_num_threads(before[1])


# Valid values of the fields tokenizers share, checked before any fitting; each tokenizer's fit
# checks what depends on the data (codebook_size against the number of items, ...).
PARAM_RANGES = {
    "levels": "[1, inf)",
    "codebook_size": "[1, inf)",
    "subspaces": "[1, inf)",
    "latent_dim": "[1, inf)",
    "hidden": "[1, inf)",
    "pca_dim": "[1, inf)",
    "epochs": "[1, inf)",
    "batch_size": "[1, inf)",
    "niter": "[1, inf)",
    "kmeans_iters": "[1, inf)",
    "opq_iters": "[0, inf)",
    "init_items": "[1, inf)",
    "reinit_every": "[1, inf)",
    "lr": "(0, inf)",
    "beta": "[0, inf)",
    "mask_ratio": "[0, 1)",
}


class Tokenizer(ABC):
    """Fits on item embeddings `[N, D]`, then encodes each item as `length` discrete codes."""

    ordered: bool = True  # False: the codes form an unordered set (OPQ)
    collision_strategies: tuple[str, ...] = ("dedup", "random")
    dim_: int | None = None

    @classmethod
    def check_params(cls, **params) -> None:
        """Raise GridError naming the first constructor field outside its valid range."""
        check_fields("tokenizer", params, PARAM_RANGES)

    @property
    @abstractmethod
    def vocab_sizes(self) -> tuple[int, ...]:
        """Number of codes available at each position."""

    @abstractmethod
    def fit(self, X: np.ndarray) -> Tokenizer:
        """Learn codebooks from embeddings; returns self."""

    @abstractmethod
    def encode(self, X: np.ndarray) -> np.ndarray:
        """Codes `[N, length]` (int64) for embeddings `[N, D]`."""

    @abstractmethod
    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        """Approximate embeddings `[N, D]` from codes."""

    def fit_encode(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).encode(X)

    def encode_balanced(self, X: np.ndarray) -> np.ndarray:
        """Codes like `encode`, with the last level re-assigned so that no two items collide."""
        if "balanced" not in self.collision_strategies:
            raise GridError(
                f"{type(self).__name__} does not support collisions=balanced; use one of "
                f"{', '.join(self.collision_strategies)}"
            )
        from grid.tokenizers.balanced import balance_last_level

        X = self._check_fitted(X)
        codes = self.encode(X)
        return balance_last_level(
            codes, self.vocab_sizes[-1], lambda items: self._last_level_cost(X[items], codes[items])
        )

    def _last_level_cost(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Squared distances `[N, vocab_sizes[-1]]` of the last level's input to its codebook."""
        raise NotImplementedError

    def _check_fitted(self, X: np.ndarray) -> np.ndarray:
        if self.dim_ is None:
            raise GridError(f"{type(self).__name__} is not fitted; call fit() before encode()")
        return check_embeddings(X, self.dim_)

    def save(self, path: str | Path) -> None:
        Path(path).write_bytes(pickle.dumps(self))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        obj = pickle.loads(Path(path).read_bytes())
        if not isinstance(obj, cls):
            raise GridError(f"{path} holds a {type(obj).__name__}, not a {cls.__name__}")
        return obj
