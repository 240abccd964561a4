"""`grid tokenize`: fit a tokenizer on the configured embeddings and report SID quality."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from grid.cache import StageCache
from grid.pipeline import prepare


def _report(cfg: DictConfig) -> tuple[dict, Path]:
    cache = StageCache(os.environ.get("GRID_CACHE", cfg.cache_dir))
    stages = prepare(cfg, cache)
    return stages.tokenizer_report, cache.path("sids", stages.sids_key)


def tokenize_command(cfg: DictConfig, out: str | None) -> dict:
    """Print the report of one composed config's tokenizer; with `out`, write it and the SIDs."""
    from grid.tokenizers.report import format_report

    report, folder = _report(cfg)
    print(format_report(report))
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("sids.npz", "tokenizer.pkl"):
            shutil.copy(folder / name, out / name)
        (out / "tokenizer_report.json").write_text(json.dumps(report, indent=2))
    return report


def compare(cfgs: dict[str, DictConfig], out: str | None) -> dict[str, dict]:
    """Reports of several composed configs (by name) side by side."""
    from grid.tokenizers.report import format_comparison

    reports = {name: _report(cfg)[0] for name, cfg in cfgs.items()}
    print(format_comparison(reports))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "tokenizer_comparison.json").write_text(json.dumps(reports, indent=2))
    return reports
