"""Quality report of a fitted tokenizer: collisions, codebook usage, fidelity, cost."""

from __future__ import annotations

import math
from pathlib import Path

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


# --- pictures --------------------------------------------------------------------------------

SUMMARY_ABOVE = 8  # more code positions than this are drawn as a band across them


def sorted_usage(codes: np.ndarray, vocab_sizes) -> list[np.ndarray]:
    """Per code position, the number of items of each code, most used first (unused: 0)."""
    return [np.sort(np.bincount(codes[:, j], minlength=v))[::-1] for j, v in enumerate(vocab_sizes)]


def collision_groups(codes: np.ndarray, bins: int) -> np.ndarray:
    """Items in groups of identical code tuples by group size, in power-of-two bins of sizes
    (1, 2, 3-4, 5-8, ...; `bins` of them)."""
    sizes = _group_sizes(codes)[0]
    which = np.ceil(np.log2(sizes)).astype(np.int64)  # 1 -> 0, 2 -> 1, 3-4 -> 2, 5-8 -> 3
    return np.bincount(which, weights=sizes, minlength=bins)


def _size_bins(largest: int) -> list[str]:
    """Labels of the power-of-two bins of collision-group sizes up to `largest`."""
    count = int(np.ceil(np.log2(largest))) + 1
    return ["1", "2"][:count] + [f"{2 ** (b - 1) + 1}-{2**b}" for b in range(2, count)]


def _plot_usage(ax, report: dict, codes: np.ndarray) -> None:
    vocab, n = report["vocab_sizes"], len(codes)
    usage = sorted_usage(codes, vocab)
    what = "level" if report["ordered"] else "subspace"
    if len(usage) > SUMMARY_ABOVE and len(set(vocab)) == 1:
        stack, rank = np.stack(usage), np.arange(1, vocab[0] + 1)
        low, q1, median, q3, high = np.percentile(stack, [0, 25, 50, 75, 100], axis=0)
        # unused codes (0 items) sit at 0.5 on the log axis, so the bands reach them
        ax.fill_between(rank, np.maximum(low, 0.5), high, alpha=0.2, color="C0", label="min-max")
        ax.fill_between(rank, np.maximum(q1, 0.5), q3, alpha=0.4, color="C0", label="25-75%")
        ax.plot(rank, median, color="C0", label=f"median of {len(usage)} {what}s")
    else:
        for j, counts in enumerate(usage):
            used = int((counts > 0).sum())
            label = f"{what} {j + 1}: {used}/{len(counts)} codes used"
            ax.plot(np.arange(1, len(counts) + 1), counts, drawstyle="steps-mid", label=label)
    for v in sorted(set(vocab)):
        ax.axhline(n / v, color="k", ls="--", lw=1, label=f"uniform: {n / v:.3g} items per code")
    ax.set_yscale("log")
    ax.set_xlabel("code rank (most used first)")
    ax.set_ylabel("items per code")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3, which="both")


def _plot_collisions(ax, report: dict, codes: np.ndarray, labels: list[str]) -> None:
    items = collision_groups(codes, len(labels))
    ax.bar(np.arange(len(labels)), items, color="C1")
    ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("collision-group size (items sharing one code tuple)")
    ax.set_ylabel("items")
    alone = report["independent_coding_rate"]
    note = f"{alone:.1%} of items alone\nlargest group: {report['max_collision_group']}"
    ax.text(0.97, 0.95, note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.grid(alpha=0.3, axis="y", which="both")


def plot_tokenizers(path: Path, tokenizers: dict[str, tuple[dict, np.ndarray]]) -> None:
    """One column per tokenizer (name -> (report, raw codes)): sorted code usage per level
    against the uniform line, and the items by collision-group size of the raw codes."""
    from grid.report import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(
        2, len(tokenizers), figsize=(5 * len(tokenizers), 7.5), squeeze=False, sharey="row"
    )
    labels = _size_bins(max(report["max_collision_group"] for report, _ in tokenizers.values()))
    for (name, (report, codes)), (top, bottom) in zip(tokenizers.items(), axes.T, strict=True):
        shape = "x".join(str(v) for v in report["vocab_sizes"])
        if len(report["vocab_sizes"]) > SUMMARY_ABOVE:
            shape = f"{len(report['vocab_sizes'])}x{report['vocab_sizes'][0]}"
        title = f"{name}: " if name != report["tokenizer"] else ""
        top.set_title(f"{title}{report['tokenizer']} {shape}, {len(codes):,} items", fontsize=10)
        _plot_usage(top, report, codes)
        _plot_collisions(bottom, report, codes, labels)
        top.yaxis.set_tick_params(labelleft=True)
        bottom.yaxis.set_tick_params(labelleft=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
