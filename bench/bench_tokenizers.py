"""Tokenizer benchmark: fit/encode time and report on Beauty; time and peak RSS at scale.

    python bench/bench_tokenizers.py            # Beauty + 250k/500k/1M synthetic vectors
    python bench/bench_tokenizers.py --quick    # Beauty only
Writes bench/results/tokenizers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grid.pipeline import build_tokenizer  # noqa: E402
from grid.sids import assign_sids  # noqa: E402
from grid.tokenizers.report import format_comparison, tokenizer_report  # noqa: E402

NAMES = ("rkmeans", "rvq", "rqvae", "opq", "mq")
SCALE_SIZES = (250_000, 500_000, 1_000_000)
SCALE_CONFIGS = {"rkmeans": {}, "opq": {"subspaces": 32}}


def beauty_embeddings() -> np.ndarray:
    from grid.cache import StageCache
    from grid.data import leave_one_out, load_sequences
    from grid.pipeline import embed

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dataset = load_sequences(ROOT / "data" / "amazon14_beauty")
    split = leave_one_out(dataset.sequences, max_history=20)
    cfg = OmegaConf.load(ROOT / "configs" / "encoder" / "minilm.yaml")
    cache = StageCache(os.environ.get("GRID_CACHE", ROOT / ".cache" / "grid"))
    return embed(dataset, split, cfg, cache)[0]


def run(name: str, X: np.ndarray, overrides: dict | None = None) -> dict:
    """Fit + encode one tokenizer from its YAML defaults; its report."""
    cfg = OmegaConf.load(ROOT / "configs" / "tokenizer" / f"{name}.yaml")
    cfg = OmegaConf.merge(cfg, overrides or {})
    tokenizer, strategy, _ = build_tokenizer(cfg)
    start = time.perf_counter()
    tokenizer.fit(X)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    codes = tokenizer.encode(X)
    encode_seconds = time.perf_counter() - start
    sids = assign_sids(codes, tokenizer.vocab_sizes, strategy, tokenizer.ordered)
    return tokenizer_report(
        tokenizer, X, codes, sids, fit_seconds, encode_seconds, collision_strategy=strategy
    )


def synthetic(n: int, dim: int = 384, clusters: int = 1000, seed: int = 0) -> np.ndarray:
    """Unit-norm Gaussian-mixture vectors, generated in chunks to keep memory at one copy."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    X = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        X[start : start + m] = centers[rng.integers(clusters, size=m)]
        X[start : start + m] += 0.5 * rng.normal(size=(m, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X


def scale_child(name: str, n: int) -> None:
    """One scale run in its own process, so that ru_maxrss is this run's peak."""
    X = synthetic(n)
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    tokenizer, _, _ = build_tokenizer(
        OmegaConf.merge(
            OmegaConf.load(ROOT / "configs" / "tokenizer" / f"{name}.yaml"),
            SCALE_CONFIGS[name],
        )
    )
    tokenizer.fit(X)
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    codes = tokenizer.encode(X)
    encode_seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        json.dumps(
            {
                "tokenizer": name,
                "items": n,
                "fit_seconds": fit_seconds,
                "encode_seconds": encode_seconds,
                "data_gib": X.nbytes / 2**30,
                "rss_after_data_gib": data_rss,
                "peak_rss_gib": peak,
                "distinct_codes": int(len(np.unique(codes, axis=0))),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 250k/500k/1M scale runs")
    parser.add_argument("--only", nargs="*", default=list(NAMES), help="tokenizers on Beauty")
    parser.add_argument("--scale-child", nargs=2, metavar=("NAME", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "tokenizers.md"))
    args = parser.parse_args()
    if args.scale_child:
        scale_child(args.scale_child[0], int(args.scale_child[1]))
        return

    X = beauty_embeddings()
    reports = {}
    for name in args.only:
        reports[name] = run(name, X)
        print(f"{name}: fit {reports[name]['fit_seconds']:.1f}s", flush=True)
    lines = [
        "# Tokenizer benchmark",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"(shared with other jobs: timings are noisy). Python {platform.python_version()}.",
        "",
        f"## Beauty ({len(X):,} items x {X.shape[1]}, MiniLM), defaults of configs/tokenizer",
        "",
        "```",
        format_comparison(reports),
        "```",
        "",
    ]
    if not args.quick:
        lines += [
            "## Scale: synthetic unit-norm 384-d vectors (1,000-cluster Gaussian mixture)",
            "",
            "rkmeans 3 x 256, opq 32 x 256; each run in a fresh process; peak RSS = ru_maxrss.",
            "",
            "| tokenizer | items | data GiB | fit s | encode s | peak RSS GiB | RSS / data |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in SCALE_CONFIGS:
            for n in SCALE_SIZES:
                out = subprocess.run(
                    [sys.executable, __file__, "--scale-child", name, str(n)],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(r, flush=True)
                lines.append(
                    f"| {name} | {n:,} | {r['data_gib']:.2f} | {r['fit_seconds']:.1f} | "
                    f"{r['encode_seconds']:.1f} | {r['peak_rss_gib']:.2f} | "
                    f"{r['peak_rss_gib'] / r['data_gib']:.1f} |"
                )
        lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
