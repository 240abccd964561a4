"""Quality report of a fitted tokenizer: collisions, codebook usage, fidelity, cost."""

from __future__ import annotations

import math

import numpy as np

from grid.sids import SemanticIDs
from grid.tokenizers.base import Tokenizer

# Rows of format_report / format_comparison, in order; lists are summarised.
_ROWS = (
    "tokenizer",
    "collision_strategy",
    "num_items",
    "sid_length",
    "bits_per_item",
    "collision_rate",
    "max_collision_group",
    "independent_coding_rate",
    "unique_sid_rate",
    "utilization",
    "perplexity",
    "gini",
    "feature_fidelity",
    "relative_reconstruction_error",
    "fit_seconds",
    "encode_seconds",
)


def _group_sizes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sizes of the groups of identical code rows, and each item's group size."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts, counts[inverse.reshape(-1)]


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, towards 1 when one dominates."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * total))


def perplexity(column: np.ndarray, vocab_size: int) -> float:
    """exp(entropy) of the empirical code distribution: the effective number of codes in use."""
    p = np.bincount(column, minlength=vocab_size) / len(column)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _registry_name(tokenizer: Tokenizer) -> str:
    from grid.tokenizers import TOKENIZERS

    for name, cls in TOKENIZERS.items():
        if type(tokenizer) is cls:
            return name
    return type(tokenizer).__name__


def _infer_strategy(codes: np.ndarray, sids: SemanticIDs) -> str:
    if sids.length > codes.shape[1]:
        return "dedup"
    return "random" if sids.num_unique < sids.num_items else "unique"


def tokenizer_report(
    tokenizer: Tokenizer,
    X: np.ndarray,
    codes: np.ndarray,
    sids: SemanticIDs,
    fit_seconds: float,
    encode_seconds: float,
    *,
    collision_strategy: str | None = None,
) -> dict:
    """JSON-serialisable quality metrics of `codes = tokenizer.encode(X)` and the final `sids`.

    Raw codes are compared as tuples, position by position. For unordered (OPQ) codes a
    position is a sub-codebook, so this equals comparing the sets of (sub-codebook, code) tokens.

    - `collision_rate`: fraction of items whose raw code tuple is shared with another item.
    - `max_collision_group`: the most items sharing one raw code tuple.
    - `independent_coding_rate`: fraction of items that are the only item with their raw code
      tuple, i.e. identified by the tokenizer alone, without a de-dup digit
      (`1 - collision_rate`).
    - `unique_sid_rate`: distinct final SIDs / items (1.0 once the strategy separates all items).
    - `utilization` / `perplexity`: per raw position, the fraction of its vocabulary used and
      exp(entropy) of its code usage.
    - `gini`: Gini coefficient of the raw-SID frequencies (items per distinct raw code tuple);
      0 when every used SID holds the same number of items.
    - `feature_fidelity`: mean cosine similarity of X and `reconstruct(codes)`;
      `relative_reconstruction_error`: ||X - X_hat||_F / ||X||_F.
    - `bits_per_item` / `sid_length`: sum of log2 vocabulary sizes and length of the final SID.

    `collision_strategy` defaults to what `sids` shows: 'dedup' when a digit was appended,
    'random' when items share SIDs, else 'unique' (random and balanced then coincide).
    """
    X = np.asarray(X, dtype=np.float32)
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    vocab = tuple(int(v) for v in tokenizer.vocab_sizes)
    group_counts, item_group_size = _group_sizes(codes)

    X_hat = np.asarray(tokenizer.reconstruct(codes), dtype=np.float32)
    dot = (X * X_hat).sum(axis=1)
    norms = np.linalg.norm(X, axis=1) * np.linalg.norm(X_hat, axis=1)
    cosine = np.where(norms > 0, dot / np.maximum(norms, 1e-12), 0.0)
    rel_err = np.linalg.norm(X - X_hat) / max(float(np.linalg.norm(X)), 1e-12)

    return {
        "tokenizer": _registry_name(tokenizer),
        "collision_strategy": collision_strategy or _infer_strategy(codes, sids),
        "num_items": int(n),
        "ordered": bool(tokenizer.ordered),
        "vocab_sizes": list(vocab),
        "sid_length": int(sids.length),
        "sid_vocab_sizes": [int(v) for v in sids.vocab_sizes],
        "bits_per_item": float(sum(math.log2(v) for v in sids.vocab_sizes if v > 0)),
        "collision_rate": float((item_group_size > 1).mean()),
        "max_collision_group": int(group_counts.max()),
        "independent_coding_rate": float((item_group_size == 1).mean()),
        "distinct_raw_sids": int(len(group_counts)),
        "unique_sid_rate": float(sids.num_unique / n),
        "utilization": [
            float(len(np.unique(codes[:, j])) / vocab[j]) for j in range(codes.shape[1])
        ],
        "perplexity": [perplexity(codes[:, j], vocab[j]) for j in range(codes.shape[1])],
        "gini": gini(group_counts),
        "feature_fidelity": float(cosine.mean()),
        "relative_reconstruction_error": float(rel_err),
        "fit_seconds": float(fit_seconds),
        "encode_seconds": float(encode_seconds),
    }


def _cell(value) -> str:
    if isinstance(value, list):
        if len(value) <= 4:
            return " ".join(_cell(v) for v in value)
        arr = np.asarray(value, dtype=np.float64)
        return f"mean {arr.mean():.3g} (min {arr.min():.3g}, max {arr.max():.3g})"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def format_report(report: dict) -> str:
    """One tokenizer's report as a two-column text table."""
    rows = [[k, _cell(report[k])] for k in _ROWS if k in report]
    return _table(["metric", "value"], rows)


def format_comparison(reports: dict[str, dict]) -> str:
    """Several reports side by side, one column per name."""
    names = list(reports)
    keys = [k for k in _ROWS if any(k in r for r in reports.values())]
    rows = [[k] + [_cell(reports[n].get(k, "")) for n in names] for k in keys]
    return _table(["metric", *names], rows)
