"""OPQ: optimised product quantisation through faiss; each item becomes an unordered code set."""

from __future__ import annotations

import math

import faiss
import numpy as np
from scipy.stats import ortho_group

from grid.errors import GridError
from grid.tokenizers.base import Tokenizer, check_embeddings, single_threaded

WHITEN_EPSILON = 1e-4  # added to each PCA eigenvalue before whitening, x the mean variance


class OptimizedPQ(Tokenizer):
    """A learned rotation, then `subspaces` sub-codebooks of `codebook_size` codes (RPG's tokens).

    `pca_dim` (optionally with `whiten`) reduces the embeddings by PCA before the rotation.
    The rotation is learned with a PQ of the same `codebook_size` from a random rotation, both
    drawn from `seed` (faiss's OPQMatrix alone would use an 8-bit PQ and a fixed seed).
    `fit(X, sample_mask)` trains on the masked rows only (e.g. items seen in training
    sequences) and `encode` still covers every item.
    """

    ordered = False
    collision_strategies = ("dedup", "random", "none")  # none: RPG's ties left tied

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

    def _nbits(self) -> int:
        return int(math.log2(self.codebook_size)) if self.codebook_size > 1 else 0

    def _build(self, dim: int) -> faiss.IndexPreTransform:
        nbits = self._nbits()
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
        # a preset A is OPQ's starting rotation (else faiss draws one with seed 1234)
        rotation = ortho_group.rvs(inner, random_state=self.seed).astype(np.float32)
        faiss.copy_array_to_vector(rotation.ravel(), opq.A)
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
            self._train(index, X)
        self.dim_, self.index_ = X.shape[1], index
        return self

    def _train(self, index: faiss.IndexPreTransform, X: np.ndarray) -> None:
        """Train the transforms in turn, OPQ with a seeded PQ and sample, then the final PQ."""
        x, last = X, index.chain.size() - 1
        for i in range(last + 1):
            vt = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                # OPQMatrix alone trains an 8-bit PQ seeded 1234 on a sample drawn with seed 1234
                rotation_pq = faiss.ProductQuantizer(vt.d_out, vt.M, self._nbits())
                rotation_pq.cp.seed = self.seed
                vt.pq = rotation_pq
                sample = x
                if len(x) > vt.max_train_points:
                    rng = np.random.default_rng(self.seed)
                    sample = x[np.sort(rng.choice(len(x), vt.max_train_points, replace=False))]
                vt.train(sample)
                vt.pq = None  # faiss does not own it
            else:
                if isinstance(vt, faiss.PCAMatrix) and vt.eigen_power != 0:
                    # whitening divides by each component's deviation: a small floor keeps
                    # directions of (numerically) zero variance finite
                    vt.epsilon = WHITEN_EPSILON * float(x.var(axis=0).mean())
                vt.train(x)
            if i < last:
                x = vt.apply(x)
        index.train(X)  # the transforms are trained: this trains the PQ alone

    def encode(self, X: np.ndarray) -> np.ndarray:
        X = self._check_fitted(X)
        packed = self.index_.sa_encode(X)
        nbits = self._nbits()
        if nbits == 8:
            return packed.astype(np.int64)
        return faiss.unpack_bitstrings(packed, self.subspaces, nbits).astype(np.int64)

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
