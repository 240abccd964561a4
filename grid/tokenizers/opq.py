"""OPQ: optimised product quantisation through faiss; each item becomes an unordered code set."""

from __future__ import annotations

import math

import faiss
import numpy as np

from grid.errors import GridError
from grid.tokenizers.base import Tokenizer, check_embeddings, single_threaded


class OptimizedPQ(Tokenizer):
    """A learned rotation, then `subspaces` sub-codebooks of `codebook_size` codes (RPG's tokens).

    `pca_dim` (optionally with `whiten`) reduces the embeddings by PCA before the rotation.
    `fit(X, sample_mask)` trains on the masked rows only (e.g. items seen in training
    sequences) and `encode` still covers every item.
    """

    ordered = False
    collision_strategies = ("dedup", "random")

    def __init__(
        self,
        subspaces: int = 32,
        codebook_size: int = 256,
        opq_iters: int = 10,
        pca_dim: int | None = None,
        whiten: bool = False,
        seed: int = 0,
    ):
        self.subspaces, self.codebook_size, self.opq_iters = subspaces, codebook_size, opq_iters
        self.pca_dim, self.whiten, self.seed = pca_dim, whiten, seed
        self.index_: faiss.IndexPreTransform | None = None

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return (self.codebook_size,) * self.subspaces

    def _build(self, dim: int) -> faiss.IndexPreTransform:
        nbits = int(math.log2(self.codebook_size)) if self.codebook_size > 1 else 0
        if not 1 <= nbits <= 16 or 2**nbits != self.codebook_size:
            raise GridError(
                f"tokenizer.codebook_size={self.codebook_size} is not a power of two in "
                f"[2, 65536]; use e.g. 256"
            )
        inner = self.pca_dim or dim
        if self.pca_dim is not None and not 0 < self.pca_dim <= dim:
            raise GridError(f"tokenizer.pca_dim={self.pca_dim} must lie in [1, {dim}]")
        if self.subspaces < 1 or inner % self.subspaces:
            raise GridError(
                f"tokenizer.subspaces={self.subspaces} does not divide the dimension {inner}; "
                f"choose a divisor (e.g. 16, 32 or 64 for 384-d embeddings)"
            )
        opq = faiss.OPQMatrix(inner, self.subspaces)
        opq.niter = self.opq_iters
        pq = faiss.IndexPQ(inner, self.subspaces, nbits)
        pq.pq.cp.seed = self.seed
        index = faiss.IndexPreTransform(opq, pq)
        if self.pca_dim is not None:
            index.prepend_transform(
                faiss.PCAMatrix(dim, self.pca_dim, -0.5 if self.whiten else 0.0, False)
            )
        return index

    def fit(self, X: np.ndarray, sample_mask: np.ndarray | None = None) -> OptimizedPQ:
        X = check_embeddings(X)
        if sample_mask is not None:
            sample_mask = np.asarray(sample_mask, dtype=bool)
            if sample_mask.shape != (len(X),):
                raise GridError(
                    f"sample_mask has shape {sample_mask.shape}; expected one flag per item "
                    f"({len(X)},)"
                )
            X = check_embeddings(X[sample_mask])
        if self.codebook_size > len(X):
            raise GridError(
                f"tokenizer.codebook_size={self.codebook_size} exceeds the {len(X)} training "
                f"items; lower codebook_size"
            )
        index = self._build(X.shape[1])
        with single_threaded():
            index.train(X)
        self.dim_, self.index_ = X.shape[1], index
        return self

    def encode(self, X: np.ndarray) -> np.ndarray:
        X = self._check_fitted(X)
        packed = self.index_.sa_encode(X)
        nbits = int(math.log2(self.codebook_size))
        if nbits == 8:
            return packed.astype(np.int64)
        return np.stack([faiss.vector_to_array(self._unpack(row, nbits)) for row in packed]).astype(
            np.int64
        )

    def _unpack(self, row: np.ndarray, nbits: int) -> faiss.Int64Vector:
        reader = faiss.BitstringReader(faiss.swig_ptr(row), len(row))
        out = faiss.Int64Vector()
        for _ in range(self.subspaces):
            out.push_back(reader.read(nbits))
        return out

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes, dtype=np.int64)
        pq = faiss.downcast_index(self.index_.index).pq
        centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        Y = np.concatenate([centroids[m][codes[:, m]] for m in range(pq.M)], axis=1)
        for i in reversed(range(self.index_.chain.size())):
            vt = faiss.downcast_VectorTransform(self.index_.chain.at(i))
            A = faiss.vector_to_array(vt.A).reshape(vt.d_out, vt.d_in)
            b = faiss.vector_to_array(vt.b) if vt.have_bias else np.zeros(vt.d_out, np.float32)
            # y = A x + b; A is orthonormal unless whitening, which the pseudo-inverse undoes
            Y = (Y - b) @ (A if vt.is_orthonormal else np.linalg.pinv(A).T)
        return Y.astype(np.float32)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.index_ is not None:
            state["index_"] = faiss.serialize_index(self.index_)
        return state

    def __setstate__(self, state: dict) -> None:
        if state.get("index_") is not None:
            state["index_"] = faiss.deserialize_index(state["index_"])
        self.__dict__.update(state)
