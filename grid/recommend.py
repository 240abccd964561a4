"""`grid recommend`: load a finished run and rank items for histories, users or a whole split."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from grid.cache import DONE, StageCache
from grid.data import Dataset, Split, pad
from grid.encoders.text import item_text
from grid.errors import GridError
from grid.generators import GENERATORS, Recommender
from grid.generators.base import INVALID_SID, NO_ITEM, matmul_precision
from grid.generators.setrec import SETRec
from grid.metrics import KS, rank_metrics
from grid.pipeline import component, params, prepare
from grid.runner import MATMUL_PRECISION, make_datamodule
from grid.sids import SemanticIDs

log = logging.getLogger(__name__)

SPLITS = ("test", "valid")
AD_HOC_USER = 0  # the user index of a history given as item ids (RPG's graph start, SID draws)
SCORES = {  # what each generator's score is
    "tiger": "beam log-probability",
    "rpg": "summed code logits",
    "sasrec": "inner product",
    "simgr": "inner product / tau",
    "setrec": "(1 - beta) x CF + beta x semantic score",
    "popularity": "training interactions",
}


class CachedStages(StageCache):
    """The stage caches a run read from, for reading only: a stage that is not there is an
    error, never a computation. Looks in each root in turn."""

    def __init__(self, roots: Sequence[Path], run: Path):
        super().__init__(roots[0])
        self.roots, self.run = list(roots), run

    def get(self, stage: str, key: str, build: Callable) -> tuple[Path, bool]:
        for root in self.roots:
            if (root / stage / key / DONE).is_file():
                return root / stage / key, True
        raise GridError(
            f"the {stage} stage this run read ({key}) is in none of the caches "
            f"{', '.join(map(str, self.roots))}; set GRID_CACHE to the cache the run used, or "
            f"rebuild it with `grid run {self.run / 'config.yaml'} --out NEW_FOLDER`"
        )


def _cache_roots(folder: Path, cfg: DictConfig) -> list[Path]:
    """GRID_CACHE (or the config's cache_dir), then the caches the run recorded in stages.json."""
    roots = [Path(os.environ.get("GRID_CACHE", cfg.cache_dir))]
    stages = folder / "stages.json"
    if stages.is_file():
        recorded = json.loads(stages.read_text())
        roots += [Path(p).parents[1] for name, p in recorded.items() if name != "model"]
    return list(dict.fromkeys(roots))


@dataclass
class Run:
    """A finished run's model, data and metrics, ready to rank items (`load_run`)."""

    folder: Path
    cfg: DictConfig
    model: Recommender
    dataset: Dataset
    split: Split
    metrics: dict[str, float]
    device: torch.device

    def __post_init__(self) -> None:
        self.item_index = {item: i for i, item in enumerate(self.dataset.item_ids)}
        self.user_index = {user: u for u, user in enumerate(self.dataset.users)}
        self._inference_ready = False

    @property
    def score_name(self) -> str:
        """What the scores of this run's generator are."""
        name = SCORES.get(self.cfg.generator.name, "score")
        return f"{name}, beta {self.model.beta:g}" if isinstance(self.model, SETRec) else name

    def title(self, item: int) -> str | None:
        """An item's text for people: its title, else its first text field that is not empty
        (Amazon 2014's title-derived `pseudo_text_idgenrec`, a description ...)."""
        meta = self.dataset.items[item]
        fields = ["title", *(f for f, v in meta.items() if f != "item_id" and isinstance(v, str))]
        return next((t for f in fields if (t := item_text(meta, [f], labels=False))), None)

    # --- ranking --------------------------------------------------------------------------------

    def _check_k(self, k: int) -> None:
        if k < 1 or k > self.dataset.num_items:
            raise GridError(
                f"k={k} is not between 1 and the catalogue's {self.dataset.num_items} items; "
                f"ask for at most {self.dataset.num_items}"
            )

    @torch.inference_mode()
    def _rank(
        self, histories: list[np.ndarray], users: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids and scores `[n, k]` for item-index histories, `trainer.eval_batch_size` at a time."""
        model = self.model
        if not self._inference_ready:
            model.start_inference()
            self._inference_ready = True
        size = self.cfg.trainer.eval_batch_size
        ids, scores = [], []
        with matmul_precision(MATMUL_PRECISION):
            for start in range(0, len(histories), size):
                rows = histories[start : start + size]
                batch = {
                    "user": torch.as_tensor(users[start : start + size]),
                    "history": torch.as_tensor(pad(rows)),
                    "length": torch.tensor([len(h) for h in rows]),
                }
                batch = {name: t.to(self.device) for name, t in batch.items()}
                top, score = model.recommend_scored(batch, k)
                ids.append(top.cpu().numpy())
                scores.append(score.float().cpu().numpy())
        return np.concatenate(ids), np.concatenate(scores)

    def _records(self, histories, users, targets, labels, k) -> list[dict]:
        ids, scores = self._rank(histories, users, k)
        out = []
        for history, target, label, row, score in zip(
            histories, targets, labels, ids, scores, strict=True
        ):
            items = []
            ranked = zip(row.tolist(), score.tolist(), strict=True)
            for rank, (item, value) in enumerate(ranked, start=1):
                if item == NO_ITEM:
                    break
                real = item != INVALID_SID
                items.append(
                    {
                        "rank": rank,
                        "item": self.dataset.item_ids[item] if real else None,
                        "title": self.title(item) if real else None,
                        "score": value,
                    }
                )
            out.append(
                {
                    "user": label,
                    "history": [self.dataset.item_ids[i] for i in history.tolist()],
                    "target": None if target is None else self.dataset.item_ids[target],
                    "items": items,
                }
            )
        return out

    def parse_history(
        self, history: str | Sequence[str], skip_unknown: bool = False, name: str = "a history"
    ) -> np.ndarray:
        """Item indices of a history given as item ids (a list, or one string of ids separated
        by spaces). An unknown id is an error, or with `skip_unknown` left out with a warning;
        `name` says which history in messages."""
        ids = history.split() if isinstance(history, str) else [str(i) for i in history]
        known = [i for i in ids if i in self.item_index]
        for unknown in (i for i in ids if i not in self.item_index):
            if not skip_unknown:
                raise GridError(
                    f"unknown item id {unknown!r} in {name}; use ids of the run's items.jsonl, "
                    f"or --skip-unknown to leave unknown ids out"
                )
            log.warning("item id %r of %s is not in the catalogue: left out", unknown, name)
        if not known:
            what = "is empty" if not ids else "has no item id of the catalogue"
            raise GridError(f"{name} {what}; give at least one item id of the catalogue")
        return np.array([self.item_index[i] for i in known], dtype=np.int64)

    def recommend(
        self,
        histories: Iterable[str | Sequence[str]],
        k: int = 10,
        skip_unknown: bool = False,
        labels: Sequence[str | None] | None = None,
    ) -> list[dict]:
        """The top-k items for each history (item ids, oldest first), one dict per history:
        `user` (its label, or None), `history`, `target` (None) and `items`, each with `rank`,
        `item` (None: a decoded SID that is no item's), `title` and `score`."""
        self._check_k(k)
        parsed = [
            self.parse_history(h, skip_unknown, f"history {n}")
            for n, h in enumerate(histories, start=1)
        ]
        labels = [None] * len(parsed) if labels is None else list(labels)
        users = np.full(len(parsed), AD_HOC_USER, dtype=np.int64)
        return self._records(parsed, users, [None] * len(parsed), labels, k)

    def recommend_users(self, users: Sequence[str], k: int = 10, next: bool = False) -> list[dict]:
        """The top-k items for dataset users (ids of the data's sequences file): from their
        test history with the held-out test item as `target`, or with `next` from their whole
        sequence (no target)."""
        self._check_k(k)
        for user in users:
            if user not in self.user_index:
                raise GridError(
                    f"unknown user {user!r}; users are the first column of the data's "
                    f"sequences file ({self.cfg.data.path})"
                )
        index = np.array([self.user_index[u] for u in users], dtype=np.int64)
        if next:
            histories = [self.dataset.sequences[u] for u in index]
            targets = [None] * len(index)
        else:
            histories = [self.split.test[0][u] for u in index]
            targets = [int(self.split.test[1][u]) for u in index]
        return self._records(histories, index, targets, list(users), k)

    # --- every user of a split, as the run evaluated them ---------------------------------------

    def write_lists(self, split: str = "test", path: str | Path | None = None) -> Path:
        """Write the top-max(K) list of every `split` user exactly as the run's evaluation
        ranked them (its batches, its code path) to a JSON-lines file (README: "Auditing a
        run"); default `RUN/ranked_<split>.jsonl`. Returns the path."""
        if split not in SPLITS:
            raise GridError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        path = Path(path) if path else self.folder / f"ranked_{split}.jsonl"
        datamodule = make_datamodule(self.cfg, self.split)
        if split == "test":
            samples, loader = datamodule.test_set, datamodule.test_dataloader()
        else:
            samples, loader = datamodule.full_valid_set, datamodule.full_val_dataloader()
        trainer = L.Trainer(
            accelerator="gpu" if self.device.type == "cuda" else "cpu",
            devices=1,
            precision=self.cfg.trainer.precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        self.model.recorded = []
        try:
            with matmul_precision(MATMUL_PRECISION):
                evaluate = trainer.test if split == "test" else trainer.validate
                evaluate(self.model, dataloaders=loader, verbose=False)
            recorded = self.model.recorded
        finally:
            self.model.recorded = None
            self._inference_ready = False  # the evaluation's caches are gone
        users, ids, scores = (torch.cat(part).numpy() for part in zip(*recorded, strict=True))
        order = np.argsort(users, kind="stable")
        users, ids, scores = users[order], ids[order], scores[order]
        item_ids = self.dataset.item_ids
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                for u, row, score in zip(users.tolist(), ids, scores, strict=True):
                    found = row != NO_ITEM
                    history = samples.history[u, : int(samples.lengths[u])].tolist()
                    record = {
                        "user": self.dataset.users[u],
                        "target": item_ids[int(samples.targets[u])],
                        "warm": bool(samples.warm[u]),
                        "history": [item_ids[i] for i in history],
                        "items": [item_ids[i] if i >= 0 else None for i in row[found].tolist()],
                        "scores": score[found].tolist(),
                    }
                    f.write(json.dumps(record) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise GridError(f"cannot write {path} ({e.strerror}); point --out at a writable file")
        return path


def list_metrics(path: str | Path, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean Recall@K and NDCG@K over the users of a `write_lists` file."""
    width, hits = max(ks), []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            row = [item == record["target"] for item in record["items"][:width]]
            hits.append(row + [False] * (width - len(row)))
    # the target is item 1 of each list, every other item 0
    hits = torch.tensor(hits, dtype=torch.long)
    per_user = rank_metrics(hits, torch.ones(len(hits), dtype=torch.long), ks)
    return {name: float(values.double().mean()) for name, values in per_user.items()}


def load_run(path: str | Path, device: str | torch.device | None = None) -> Run:
    """Load a finished `grid run` folder (config.yaml, metrics.json, model.ckpt, sids.npz and
    the cached stages it read) onto `device` (default: the GPU if there is one)."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise GridError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GridError(f"device {device} is a GPU but none is visible; use cpu")
    folder = Path(path)
    if not folder.is_dir():
        raise GridError(f"run folder {folder} does not exist; give the --out folder of a grid run")
    missing = [n for n in ("config.yaml", "metrics.json") if not (folder / n).is_file()]
    if missing:
        raise GridError(
            f"{folder} is not a finished run (no {' or '.join(missing)}); give the --out folder "
            f"of a grid run that finished"
        )
    cfg = OmegaConf.load(folder / "config.yaml")
    metrics = json.loads((folder / "metrics.json").read_text())
    generator_cls = component(GENERATORS, cfg.generator, "generator")
    needs = (["model.ckpt"] if generator_cls.trainable else []) + (
        ["sids.npz"] if "sids" in generator_cls.consumes else []
    )
    for name in needs:
        if not (folder / name).is_file():
            raise GridError(
                f"{folder} has no {name}, which {cfg.generator.name} needs; copy the whole run "
                f"folder, or run `grid run {folder / 'config.yaml'} --out NEW_FOLDER` again"
            )
    cache = CachedStages(_cache_roots(folder, cfg), folder)
    # SIDs from the run folder itself: the tokenizer stage (and the embeddings it read) not needed
    stages = prepare(cfg, cache, generator_cls.consumes - {"sids"})
    if "sids" in generator_cls.consumes:
        stages.sids = SemanticIDs.load(folder / "sids.npz")
    packed = cfg.trainer.get("packed", True)  # runs from before the fixed-shape path packed
    model = generator_cls.build(stages.inputs(), **params(cfg.generator), packed=packed)
    if generator_cls.trainable:
        model.load_checkpoint(folder / "model.ckpt")
    if isinstance(model, SETRec) and model.beta is None:  # chosen on validation by the run
        if "setrec/beta" not in metrics:
            raise GridError(f"{folder}/metrics.json has no setrec/beta; run it again to choose it")
        model.beta = round(metrics["setrec/beta"], 6)  # logged as float32: back to 0.1 steps
    model.eval().to(device)
    return Run(folder, cfg, model, stages.dataset, stages.split, metrics, device)
