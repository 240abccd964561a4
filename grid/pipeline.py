"""The cached stages that feed a generator: data -> embeddings -> semantic IDs."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from grid.cache import StageCache, stage_key
from grid.config import available, load_group
from grid.data import Dataset, Split, leave_one_out, load_dataset
from grid.encoders import ENCODERS
from grid.errors import GridError
from grid.generators.base import PipelineInputs
from grid.sids import SemanticIDs, assign_sids
from grid.tokenizers import TOKENIZERS, Tokenizer
from grid.tokenizers.base import check_embeddings

log = logging.getLogger(__name__)

# Bump when a stage's output format or algorithm changes, so old caches are not reused.
STAGE_VERSIONS = {"embeddings": 1, "sids": 2}


def params(cfg: DictConfig) -> dict:
    """A component config's constructor kwargs: every field but `name`."""
    fields = OmegaConf.to_container(cfg, resolve=True)
    fields.pop("name", None)
    return fields


def component(registry: dict, cfg: DictConfig, group: str):
    """The registered class a config's `name` selects."""
    if cfg.name not in registry:
        raise GridError(
            f"unknown {group} {cfg.name!r}; registered {group}s: {', '.join(sorted(registry))}"
        )
    return registry[cfg.name]


# The stage outputs a generator can consume (`Recommender.consumes`).
STAGE_OUTPUTS = frozenset({"embeddings", "sids", "cf_embeddings"})


@dataclass
class Stages:
    """Everything the generator stage needs, with each stage's cache key (None: not run)."""

    dataset: Dataset
    split: Split
    embeddings: np.ndarray | None = None
    embeddings_key: str | None = None
    sids: SemanticIDs | None = None
    sids_key: str | None = None
    tokenizer_report: dict | None = None
    cf_embeddings: np.ndarray | None = None
    cf_embeddings_key: str | None = None

    def key(self, output: str) -> str | None:
        """The cache key of a stage output named as in `Recommender.consumes`."""
        return getattr(self, f"{output}_key")

    def inputs(self) -> PipelineInputs:
        """What a generator is built from."""
        return PipelineInputs(
            self.dataset.num_items,
            self.dataset.num_users,
            self.split.train,
            self.sids,
            self.embeddings,
            cf_embeddings=self.cf_embeddings,
        )


def load_split(data_cfg: DictConfig) -> tuple[Dataset, Split]:
    dataset = load_dataset(data_cfg)
    return dataset, leave_one_out(dataset.sequences, data_cfg.max_history)


def embed(
    dataset: Dataset, split: Split, encoder_cfg: DictConfig, cache: StageCache
) -> tuple[np.ndarray, str]:
    """Item embeddings from the configured encoder, cached by (dataset, encoder config).

    `name: concat` joins the embeddings of the encoders listed in `parts` (names of encoder
    configs, or inline configs; each cached on its own), L2-normalising each part first when
    `normalize` is set.
    """
    if encoder_cfg.name == "concat":
        parts = [
            embed(
                dataset,
                split,
                OmegaConf.create(load_group("encoder", p)) if isinstance(p, str) else p,
                cache,
            )
            for p in encoder_cfg.parts
        ]
        if encoder_cfg.normalize:
            parts = [
                (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), k)
                for x, k in parts
            ]
        key = stage_key("concat", [k for _, k in parts], encoder_cfg.normalize)
        return np.concatenate([x for x, _ in parts], axis=1), key
    encoder = component(ENCODERS, encoder_cfg, "encoder")(**params(encoder_cfg))
    key = stage_key("embeddings", STAGE_VERSIONS["embeddings"], dataset.fingerprint, encoder_cfg)

    def build(folder: Path) -> None:
        X = check_embeddings(encoder.encode(dataset, split))
        if len(X) != dataset.num_items:
            raise GridError(f"encoder returned {len(X)} rows for {dataset.num_items} items")
        np.save(folder / "embeddings.npy", X)

    folder, hit = cache.get("embeddings", key, build)
    log.info("embeddings %s (%s)", key, "cached" if hit else "computed")
    return np.load(folder / "embeddings.npy"), key


def embed_collaborative(
    dataset: Dataset, split: Split, encoder: str | DictConfig | None, cache: StageCache
) -> tuple[np.ndarray, str]:
    """CF item embeddings from `generator.cf_encoder` (a `cf` encoder config name or inline
    config), for generators that read them beside the text embeddings; cached like `embed`."""
    choices = ", ".join(n for n in available("encoder") if n.startswith("cf:"))
    if encoder is None:
        raise GridError(
            f"this generator needs collaborative item embeddings but generator.cf_encoder is "
            f"null; set it to a CF encoder config ({choices})"
        )
    cfg = OmegaConf.create(load_group("encoder", encoder) if isinstance(encoder, str) else encoder)
    if cfg.get("name") != "cf":
        raise GridError(
            f"generator.cf_encoder={encoder if isinstance(encoder, str) else 'inline'} is a "
            f"{cfg.get('name')!r} encoder, not a collaborative one; choose one of {choices}"
        )
    return embed(dataset, split, cfg, cache)


FIT_ITEMS = ("all", "train")


def build_tokenizer(cfg: DictConfig) -> tuple[Tokenizer, str, str]:
    """The tokenizer a config describes, its collision strategy and which items it fits on."""
    kwargs = params(cfg)
    strategy = kwargs.pop("collisions", "dedup")
    fit_items = kwargs.pop("fit_items", "all")
    if fit_items not in FIT_ITEMS:
        raise GridError(f"tokenizer.fit_items={fit_items!r}; choose one of {FIT_ITEMS}")
    tokenizer_cls = component(TOKENIZERS, cfg, "tokenizer")
    tokenizer_cls.check_params(**kwargs)
    tokenizer = tokenizer_cls(**kwargs)
    if strategy not in tokenizer.collision_strategies:
        raise GridError(
            f"tokenizer {cfg.name!r} cannot use collisions={strategy!r}; it supports "
            f"{', '.join(tokenizer.collision_strategies)}"
        )
    return tokenizer, strategy, fit_items


def tokenize(
    X: np.ndarray,
    embeddings_key: str,
    tokenizer_cfg: DictConfig,
    cache: StageCache,
    train_items: np.ndarray | None = None,
) -> tuple[SemanticIDs, str, dict]:
    """Fit the tokenizer and assign SIDs, cached by (embeddings, tokenizer config).

    With `fit_items: train` the codebooks are fitted on `train_items` (items seen in training
    sequences) only; every item is encoded.
    """
    from grid.tokenizers.report import tokenizer_report

    tokenizer, strategy, fit_items = build_tokenizer(tokenizer_cfg)
    key = stage_key("sids", STAGE_VERSIONS["sids"], embeddings_key, tokenizer_cfg)

    def build(folder: Path) -> None:
        if fit_items == "train" and train_items is None:
            raise GridError("tokenizer.fit_items=train needs the training split")
        start = time.perf_counter()
        tokenizer.fit(X if fit_items == "all" else X[train_items])
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        codes = tokenizer.encode_balanced(X) if strategy == "balanced" else tokenizer.encode(X)
        encode_seconds = time.perf_counter() - start
        sids = assign_sids(codes, tokenizer.vocab_sizes, strategy, tokenizer.ordered)
        report = tokenizer_report(
            tokenizer, X, codes, sids, fit_seconds, encode_seconds, collision_strategy=strategy
        )
        tokenizer.save(folder / "tokenizer.pkl")
        np.savez(
            folder / "sids.npz",
            codes=sids.codes,
            vocab_sizes=np.array(sids.vocab_sizes),
            ordered=sids.ordered,
        )
        (folder / "tokenizer_report.json").write_text(json.dumps(report, indent=2))

    folder, hit = cache.get("sids", key, build)
    log.info("semantic IDs %s (%s)", key, "cached" if hit else "computed")
    sids = SemanticIDs.load(folder / "sids.npz")
    return sids, key, json.loads((folder / "tokenizer_report.json").read_text())


def prepare(
    cfg: DictConfig,
    cache: StageCache,
    consumes: frozenset[str] = frozenset({"sids"}),
    min_items: int = 1,
) -> Stages:
    """Run (or reuse) the data stage and the stages that produce `consumes`, with their inputs.

    The tokenizer config is checked before any stage runs; a catalogue of fewer than `min_items`
    items (the largest K of the metrics) is refused.
    """
    if unknown := consumes - STAGE_OUTPUTS:
        raise GridError(f"no stage produces {sorted(unknown)}; stages: {sorted(STAGE_OUTPUTS)}")
    if "sids" in consumes:
        build_tokenizer(cfg.tokenizer)
    dataset, split = load_split(cfg.data)
    if dataset.num_items < min_items:
        raise GridError(
            f"the {dataset.name} catalogue has {dataset.num_items} items, fewer than the largest "
            f"K={min_items}, so Recall/NDCG@{min_items} would be meaningless; use a dataset of at "
            f"least {min_items} items"
        )
    stages = Stages(dataset, split)
    if consumes & {"embeddings", "sids"}:
        stages.embeddings, stages.embeddings_key = embed(dataset, split, cfg.encoder, cache)
    if "sids" in consumes:
        seen = np.unique(np.concatenate(split.train))
        stages.sids, stages.sids_key, stages.tokenizer_report = tokenize(
            stages.embeddings, stages.embeddings_key, cfg.tokenizer, cache, seen
        )
    if "cf_embeddings" in consumes:
        stages.cf_embeddings, stages.cf_embeddings_key = embed_collaborative(
            dataset, split, cfg.generator.get("cf_encoder"), cache
        )
    return stages
