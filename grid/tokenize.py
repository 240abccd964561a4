"""`grid tokenize`: fit a tokenizer on the configured embeddings and report SID quality."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from grid.cache import StageCache
from grid.config import compose
from grid.pipeline import prepare


def _report(experiment: str | None, overrides: list[str]) -> tuple[dict, Path]:
    cfg = compose(experiment, overrides)
    cache = StageCache(os.environ.get("GRID_CACHE", cfg.cache_dir))
    stages = prepare(cfg, cache)
    return stages.tokenizer_report, cache.path("sids", stages.sids_key)


def tokenize_command(experiment: str | None, overrides: list[str], out: str | None) -> dict:
    """Print the report of one tokenizer; with `out`, write it and the SIDs there."""
    from grid.tokenizers.report import format_report

    report, folder = _report(experiment, overrides)
    print(format_report(report))
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("sids.npz", "tokenizer.pkl"):
            shutil.copy(folder / name, out / name)
        (out / "tokenizer_report.json").write_text(json.dumps(report, indent=2))
    return report


def compare(experiments: list[str], overrides: list[str], out: str | None) -> dict[str, dict]:
    """Reports of several experiment files side by side."""
    from grid.tokenizers.report import format_comparison

    reports = {Path(e).stem: _report(e, overrides)[0] for e in experiments}
    print(format_comparison(reports))
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "tokenizer_comparison.json").write_text(json.dumps(reports, indent=2))
    return reports
