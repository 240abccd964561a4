"""`grid tokenize`: fit a tokenizer on the configured embeddings and report SID quality."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from grid.cache import StageCache
from grid.pipeline import prepare


def _report(cfg: DictConfig) -> tuple[dict, Path]:
    cache = StageCache(os.environ.get("GRID_CACHE", cfg.cache_dir))
    stages = prepare(cfg, cache)
    return stages.tokenizer_report, cache.path("sids", stages.sids_key)


def raw_codes(folder: Path, report: dict) -> np.ndarray:
    """The tokenizer's own codes, without a de-dup digit, from a SID folder's sids.npz."""
    return np.load(folder / "sids.npz")["codes"][:, : len(report["vocab_sizes"])]


def tokenize_command(cfg: DictConfig, out: str | Path) -> dict:
    """Print the report of one composed config's tokenizer; write it, its picture
    (tokenizer_report.png) and the SIDs to `out`."""
    from grid.tokenizers.report import format_report, plot_tokenizers

    report, folder = _report(cfg)
    print(format_report(report))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("sids.npz", "tokenizer.pkl"):
        shutil.copy(folder / name, out / name)
    (out / "tokenizer_report.json").write_text(json.dumps(report, indent=2))
    codes = {report["tokenizer"]: (report, raw_codes(folder, report))}
    plot_tokenizers(out / "tokenizer_report.png", codes)
    print(f"wrote tokenizer_report.json, tokenizer_report.png, sids.npz to {out}")
    return report


def compare(cfgs: dict[str, DictConfig], out: str | Path) -> dict[str, dict]:
    """Reports of several composed configs (by name) side by side, written with their picture
    (tokenizer_comparison.png) to `out`."""
    from grid.tokenizers.report import format_comparison, plot_tokenizers

    reports, codes = {}, {}
    for name, cfg in cfgs.items():
        reports[name], folder = _report(cfg)
        codes[name] = (reports[name], raw_codes(folder, reports[name]))
    print(format_comparison(reports))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer_comparison.json").write_text(json.dumps(reports, indent=2))
    plot_tokenizers(out / "tokenizer_comparison.png", codes)
    print(f"wrote tokenizer_comparison.json, tokenizer_comparison.png to {out}")
    return reports
