"""Shared fixtures: the bundled Beauty data and its MiniLM item embeddings (cached on disk)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from grid.cache import StageCache
from grid.data import Dataset, Split, leave_one_out, load_sequences
from grid.pipeline import embed

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT / "data" / "amazon14_beauty"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Small models gain nothing from a second thread and lose much when the two cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def beauty() -> Dataset:
    return load_sequences(BEAUTY)


@pytest.fixture(scope="session")
def beauty_split(beauty: Dataset) -> Split:
    return leave_one_out(beauty.sequences, max_history=20)


@pytest.fixture(scope="session")
def stage_cache() -> StageCache:
    """The repository's stage cache, so that embeddings are computed once across test runs."""
    return StageCache(os.environ.get("GRID_CACHE", ROOT / ".cache" / "grid"))


@pytest.fixture(scope="session")
def beauty_embeddings(beauty: Dataset, beauty_split: Split, stage_cache: StageCache) -> np.ndarray:
    """MiniLM embeddings of all 12,101 Beauty items, computed once and kept in the stage cache."""
    cfg = OmegaConf.load(ROOT / "configs" / "encoder" / "minilm.yaml")
    X, _ = embed(beauty, beauty_split, cfg, stage_cache)
    return X


# Lightning Trainer arguments for tests: CPU, nothing written, nothing printed.
QUIET = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def beauty_slice(folder: Path, users: int) -> Path:
    """Write the first `users` Beauty users and the items they touch to `folder`, plain format."""
    with gzip.open(BEAUTY / "sequences.tsv.gz", "rt") as f:
        lines = [next(f) for _ in range(users)]
    used = {i for line in lines for i in line.split("\t")[1].split()}
    with gzip.open(BEAUTY / "items.jsonl.gz", "rt") as f:
        items = [line for line in f if json.loads(line)["item_id"] in used]
    (folder / "sequences.tsv").write_text("".join(lines))
    (folder / "items.jsonl").write_text("".join(items))
    return folder


@pytest.fixture(scope="session")
def small_beauty(tmp_path_factory):
    """The first 400 Beauty users and the items they touch, in the plain format."""
    return beauty_slice(tmp_path_factory.mktemp("small_beauty"), 400)
