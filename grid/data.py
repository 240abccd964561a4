"""Datasets, the leave-one-out split, training samples and the Lightning datamodule.

On-disk format (the one every bundled dataset uses, and the one to produce for your own data):
- `sequences.tsv[.gz]`: one user per line, `user_id<TAB>item_id item_id ...`, oldest first.
- `items.jsonl[.gz]`: one JSON object per item with an `item_id` and any text fields
  (`title`, `brand`, `categories`, `description`, `price`, ...).
MovieLens can also be read from its ratings file (`user_id item_id rating timestamp`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from grid.config import available, load_group
from grid.errors import GridError

log = logging.getLogger(__name__)

MIN_INTERACTIONS = 3  # leave-one-out needs one training, one validation and one test item
TEXT_SOURCES = ("pseudo", "metadata")  # `data.text`: the bundled items, or `grid data fetch`'s
# `data` fields that say where the files are; what they hold is in `Dataset.fingerprint`.
SOURCE_FIELDS = ("path", "text", "metadata_url", "metadata_sha256")


@dataclass
class Dataset:
    """A catalogue of items and one chronological item sequence per user (internal ids 0..N-1)."""

    name: str
    item_ids: list[str]
    items: list[dict]
    users: list[str]
    sequences: list[np.ndarray]
    fingerprint: str

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


def _find(path: Path, stem: str) -> Path:
    for candidate in (path / stem, path / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise GridError(
        f"missing data file {path / stem}[.gz]: point data.path at a folder holding "
        f"sequences.tsv[.gz] and items.jsonl[.gz] (see README, 'Your own data')"
    )


def _lines(path: Path):
    """Yield (line number, text) of a plain or gzipped text file."""
    try:
        if path.suffix == ".gz":  # inflate it all first: damage shows before any line is parsed
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
        text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
        for number, line in enumerate(text, start=1):
            yield number, line.rstrip("\n")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise GridError(
            f"{path} is a truncated or corrupt gzip file ({e}); download it again, or "
            f"re-compress the original with gzip"
        )
    except (OSError, UnicodeDecodeError) as e:
        raise GridError(
            f"cannot read {path}: {e}; check the file is UTF-8 text (optionally gzipped)"
        )


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def read_items(path: Path) -> tuple[list[str], list[dict]]:
    """Read items.jsonl: external ids (as strings) and their metadata, in file order."""
    ids, items, seen = [], [], set()
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise GridError(f"{path}:{number}: malformed JSON ({e.msg}); fix or remove that line")
        if not isinstance(item, dict) or "item_id" not in item:
            raise GridError(f"{path}:{number}: expected a JSON object with an 'item_id' field")
        item_id = str(item["item_id"])
        if item_id.split() != [item_id]:  # empty, or holding whitespace
            raise GridError(
                f"{path}:{number}: item_id {item_id!r} is empty or holds whitespace, which "
                f"separates item ids in the sequences file; rename it in both files"
            )
        if item_id in seen:
            raise GridError(
                f"{path}:{number}: duplicate item_id {item_id!r}; item ids must be unique"
            )
        seen.add(item_id)
        ids.append(item_id)
        items.append(item)
    if not ids:
        raise GridError(f"{path} holds no items: the catalogue is empty")
    return ids, items


def read_sequences(path: Path, index: dict[str, int]) -> tuple[list[str], list[np.ndarray]]:
    """Read sequences.tsv as internal ids; every item must be in the catalogue.

    A user on several lines gets one sequence: each later line continues it, in file order.
    """
    chunks: dict[str, list[np.ndarray]] = {}  # users in the order of their first line
    repeated = 0
    for number, line in _lines(path):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise GridError(
                f"{path}:{number}: expected 'user_id<TAB>item_id item_id ...', got {len(parts)} "
                f"tab-separated fields"
            )
        user, items = parts
        try:
            seq = np.fromiter((index[i] for i in items.split()), dtype=np.int64)
        except KeyError as e:
            raise GridError(
                f"{path}:{number}: item {e.args[0]!r} not in items.jsonl; add it there or drop it"
            )
        repeated += user in chunks
        chunks.setdefault(user, []).append(seq)
    if repeated:
        log.warning(
            "%s: %d lines repeat an earlier user_id; each continues that user's sequence "
            "(in file order)",
            path,
            repeated,
        )
    sequences = [c[0] if len(c) == 1 else np.concatenate(c) for c in chunks.values()]
    return list(chunks), sequences


def _drop_short(name: str, users: list[str], sequences: list[np.ndarray]):
    keep = [i for i, s in enumerate(sequences) if len(s) >= MIN_INTERACTIONS]
    dropped = len(sequences) - len(keep)
    if not keep:
        raise GridError(
            f"{name}: no user has {MIN_INTERACTIONS} or more interactions, so leave-one-out leaves "
            f"nothing to train on; provide longer sequences"
        )
    if dropped:
        log.warning(
            "%s: dropped %d users with fewer than %d interactions", name, dropped, MIN_INTERACTIONS
        )
    return [users[i] for i in keep], [sequences[i] for i in keep]


def load_sequences(
    path: str | Path, name: str | None = None, items_file: Path | None = None
) -> Dataset:
    """Load a folder in the plain format (sequences.tsv + items.jsonl, optionally gzipped);
    `items_file` replaces the folder's items.jsonl."""
    path = Path(path)
    if not path.is_dir():
        raise GridError(f"data folder {path} does not exist; set data.path to a dataset folder")
    items_file, seq_file = items_file or _find(path, "items.jsonl"), _find(path, "sequences.tsv")
    item_ids, items = read_items(items_file)
    users, sequences = read_sequences(seq_file, {i: k for k, i in enumerate(item_ids)})
    name = name or path.name
    users, sequences = _drop_short(name, users, sequences)
    return Dataset(name, item_ids, items, users, sequences, _digest(items_file, seq_file))


def load_movielens(path: str | Path, name: str | None = None, min_rating: float = 0.0) -> Dataset:
    """Load MovieLens from its ratings file, ordering each user's items by (timestamp, item id)."""
    path = Path(path)
    items_file, ratings_file = _find(path, "items.jsonl"), _find(path, "ratings.tsv")
    item_ids, items = read_items(items_file)
    index = {i: k for k, i in enumerate(item_ids)}
    by_user: dict[str, list[tuple[int, int]]] = {}
    for number, line in _lines(ratings_file):
        fields = line.split()
        if number == 1 and not fields[0].isdigit():
            continue  # header
        try:
            user, item, rating, ts = fields[0], fields[1], float(fields[2]), int(fields[3])
        except (IndexError, ValueError):
            raise GridError(f"{ratings_file}:{number}: expected 'user item rating timestamp'")
        if item not in index:
            raise GridError(f"{ratings_file}:{number}: item {item!r} is not in items.jsonl")
        if rating >= min_rating:
            by_user.setdefault(user, []).append((ts, index[item]))
    users = sorted(by_user, key=lambda u: (len(u), u))
    sequences = [np.array([i for _, i in sorted(by_user[u])], dtype=np.int64) for u in users]
    name = name or path.name
    users, sequences = _drop_short(name, users, sequences)
    digest = _digest(items_file, ratings_file) + f"-r{min_rating}"
    return Dataset(name, item_ids, items, users, sequences, digest)


LOADERS = {"sequences": load_sequences, "movielens": load_movielens}


def user_data_dir() -> Path:
    """The user's data folder, where `grid data fetch` writes: `GRID_DATA`, else
    `$XDG_DATA_HOME/grid` (`~/.local/share/grid`); never the bundled `data/`."""
    if "GRID_DATA" in os.environ:
        return Path(os.environ["GRID_DATA"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "grid"


def fetched_items_file(name: str) -> Path:
    """The item file with real text that `grid data fetch` writes for dataset `name`."""
    return user_data_dir() / name / "items.jsonl.gz"


def _metadata_items(cfg) -> Path:
    """The fetched item file a `data.text=metadata` config reads; it must exist."""
    if "metadata_url" not in cfg:
        raise GridError(
            f"data.text=metadata: {cfg.name} has no metadata to fetch (no data.metadata_url); "
            f"use data.text=pseudo"
        )
    items_file = fetched_items_file(cfg.name)
    if not items_file.is_file():
        choice = next(
            (n for n in available("data") if load_group("data", n).get("name") == cfg.name),
            cfg.name,
        )
        raise GridError(
            f"data.text=metadata but {items_file} does not exist; run `grid data fetch {choice}` "
            f"first (or use data.text=pseudo)"
        )
    return items_file


def load_dataset(cfg) -> Dataset:
    """Load the dataset a `data` config describes; `data.text=metadata` reads the item file
    with real text that `grid data fetch` wrote to the user's data folder."""
    if cfg.format not in LOADERS:
        raise GridError(f"unknown data.format {cfg.format!r}; choose one of {sorted(LOADERS)}")
    text = cfg.get("text", "pseudo")
    if text not in TEXT_SOURCES:
        raise GridError(f"data.text={text!r} is not one of {', '.join(TEXT_SOURCES)}; pick one")
    kwargs = {"min_rating": cfg.min_rating} if cfg.format == "movielens" else {}
    if text == "metadata":
        kwargs["items_file"] = _metadata_items(cfg)
    return LOADERS[cfg.format](cfg.path, name=cfg.name, **kwargs)


# --- split and samples -----------------------------------------------------------------------


@dataclass
class Split:
    """Leave-one-out: last item test, second-to-last validation, the rest training."""

    train: list[np.ndarray]
    valid: tuple[list[np.ndarray], np.ndarray]  # (histories, targets)
    test: tuple[list[np.ndarray], np.ndarray]


def leave_one_out(sequences: list[np.ndarray], max_history: int) -> Split:
    """Split every user's sequence; eval histories keep the last `max_history` items."""
    train = [s[:-2] for s in sequences]
    valid = ([s[:-2][-max_history:] for s in sequences], np.array([s[-2] for s in sequences]))
    test = ([s[:-1][-max_history:] for s in sequences], np.array([s[-1] for s in sequences]))
    return Split(train, valid, test)


def training_samples(train: list[np.ndarray], max_history: int, sliding_window: bool = True):
    """(users, histories, targets) for next-item training on the training part of each sequence.

    With `sliding_window` every prefix predicts its next item; without it only the last training
    item is predicted from everything before it.
    """
    users, histories, targets = [], [], []
    for u, seq in enumerate(train):
        ends = range(1, len(seq)) if sliding_window else range(len(seq) - 1, len(seq))
        for t in ends:
            if t < 1:
                continue
            users.append(u)
            histories.append(seq[max(0, t - max_history) : t])
            targets.append(seq[t])
    return np.array(users, dtype=np.int64), histories, np.array(targets, dtype=np.int64)


def pad(histories: list[np.ndarray], width: int | None = None) -> np.ndarray:
    """Right-pad histories with -1 into one int64 array."""
    width = width or max(len(h) for h in histories)
    out = np.full((len(histories), width), -1, dtype=np.int64)
    for row, h in zip(out, histories, strict=True):
        row[: len(h)] = h
    return out


def last_items(
    history: torch.Tensor, length: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each row's `n` most recent items of right-padded histories `[B, T]` (pad: -1)."""
    if history.shape[1] <= n:
        return history, length
    ar = torch.arange(n, device=history.device)
    start = (length - n).clamp(min=0)
    idx = (start[:, None] + ar).clamp(max=history.shape[1] - 1)
    length = length.clamp(max=n)
    return history.gather(1, idx).masked_fill(ar >= length[:, None], -1), length


def history_widths(max_history: int) -> tuple[int, ...]:
    """The padded history widths of the fixed-shape path: a quarter, half and all of
    `max_history`, so a compiled model sees three shapes instead of one per longest history."""
    return tuple(sorted({-(-max_history // 4), -(-max_history // 2), max_history}))


class SequenceSamples(TorchDataset):
    """(user, history, target) rows; each item of the dataset is one batch-ready dict.

    Evaluation samples also carry `warm`: whether the target appears in the training sequences.
    A batch's histories are cut to its longest one, or with `widths` to the narrowest of those
    widths that holds it. `to(device)` keeps the rows there (batches are gathered on the device);
    the widths are read from a host copy of the lengths.
    """

    def __init__(
        self,
        users: np.ndarray,
        histories: list[np.ndarray],
        targets: np.ndarray,
        train_items: np.ndarray | None = None,
        widths: tuple[int, ...] | None = None,
    ):
        self.widths = widths
        self.users = torch.as_tensor(users)
        self.lengths = torch.tensor([len(h) for h in histories])
        self.host_lengths = self.lengths.numpy()
        self.history = torch.as_tensor(pad(histories))
        self.targets = torch.as_tensor(targets)
        self.warm = None if train_items is None else torch.as_tensor(np.isin(targets, train_items))
        self.rows = {"user": self.users, "length": self.lengths, "target": self.targets}
        if self.warm is not None:
            self.rows["warm"] = self.warm

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        return i

    def to(self, device: torch.device | str) -> SequenceSamples:
        """Keep the rows on `device`: each batch is then gathered there, not copied to it."""
        self.rows = {name: rows.to(device) for name, rows in self.rows.items()}
        self.history = self.history.to(device)
        return self

    def collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        width = int(self.host_lengths[idx].max())  # numpy: no tensor read back
        if self.widths:
            width = min([w for w in self.widths if w >= width] or [width])
        idx = torch.as_tensor(idx, device=self.history.device)
        batch = {name: rows[idx] for name, rows in self.rows.items()}
        batch["history"] = self.history[idx, :width]
        return batch


class LengthBucketSampler(Sampler):
    """Batches of similar history length, so padding to the batch's longest costs little.

    Indices are shuffled, cut into pools of `pool` batches, sorted by length inside a pool and
    batched; the batch order is shuffled again (`pool=1`: plain random batches). Without
    `shuffle` it sorts the whole set.
    The order depends on the seed and the epoch that `set_epoch` sets (Lightning calls it);
    `state_dict` holds the position in it, so a resumed run continues where it stopped.
    Under DDP (`num_replicas` processes, by default torch.distributed's) each process takes its
    share: in training every `num_replicas`-th batch, the list padded with its first batches so
    that all processes step together; in evaluation every `num_replicas`-th user of the sorted
    order, without padding, so that each user is scored exactly once. With `full_batches`, a
    short last training batch is filled up with the epoch's first samples (one batch shape).
    """

    def __init__(
        self,
        lengths: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        pool: int = 64,
        num_replicas: int | None = None,
        rank: int | None = None,
        full_batches: bool = False,
    ):
        self.lengths, self.batch_size, self.shuffle = lengths, batch_size, shuffle
        self.full_batches = full_batches
        self.seed, self.pool = seed, pool
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch, self.position, self.resume_at = 0, 0, 0

    def _shard(self) -> tuple[int, int]:
        """This process's rank and the number of processes sharing the data."""
        if self.num_replicas is not None:
            return self.rank or 0, self.num_replicas
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __len__(self) -> int:
        rank, world = self._shard()
        n, b = len(self.lengths), self.batch_size
        if self.shuffle:
            batches = -(-n // b)
            return -(-batches // world)
        return -(-len(range(rank, n, world)) // b)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.resume_at = epoch, 0

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of its batches were handed out."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Make the next pass start after the batches `state` says were handed out."""
        self.epoch, self.resume_at = state["epoch"], state["position"]

    def _batches(self) -> list[torch.Tensor]:
        rank, world = self._shard()
        n, b = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = torch.argsort(self.lengths, stable=True)[rank::world]
            return [order[i : i + b] for i in range(0, len(order), b)]
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=g)
        if self.full_batches and n % b:
            perm = torch.cat([perm, perm[: b - n % b]])
            n = len(perm)
        batches = []
        for start in range(0, n, b * self.pool):
            chunk = perm[start : start + b * self.pool]
            chunk = chunk[torch.argsort(self.lengths[chunk], stable=True)]
            batches += [chunk[i : i + b] for i in range(0, len(chunk), b)]
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        if world > 1:
            pad = len(self) * world - len(batches)
            batches += [batches[i % len(batches)] for i in range(pad)]
            batches = batches[rank::world]
        return batches

    def __iter__(self):
        batches = self._batches()
        start, self.resume_at = self.resume_at, 0
        for i in range(start, len(batches)):
            self.position = i + 1
            yield batches[i].tolist()


class BucketLoader(DataLoader):
    """A DataLoader of a LengthBucketSampler's batches; Lightning saves and restores its position
    in checkpoints (a DataLoader with `state_dict` is what Lightning treats as resumable)."""

    def __init__(self, dataset: SequenceSamples, sampler: LengthBucketSampler, **kwargs):
        # batch_size=None: the sampler yields whole batches, and Lightning finds it as `.sampler`
        # to call set_epoch on (it does not look at a custom `batch_sampler`). Its own generator:
        # each new iterator draws a seed from it, which must not shift the global RNG (dropout).
        # Under DDP the sampler shards itself: the runner's Trainer keeps Lightning's padding
        # distributed sampler out (use_distributed_sampler=False).
        kwargs = {"batch_size": None, "collate_fn": dataset.collate, **kwargs}
        super().__init__(dataset, sampler=sampler, generator=torch.Generator(), **kwargs)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state:
            self.sampler.load_state_dict(state)


class SequenceDataModule(L.LightningDataModule):
    """Training samples (length-bucketed) and validation/test histories for one split."""

    def __init__(
        self,
        split: Split,
        max_history: int = 20,
        sliding_window: bool = True,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        bucket: bool = True,
        seed: int = 0,
        val_users: int | None = None,
        fixed_shapes: bool = False,
    ):
        super().__init__()
        self.split, self.batch_size, self.eval_batch_size = split, batch_size, eval_batch_size
        self.bucket, self.seed, self.fixed_shapes = bucket, seed, fixed_shapes
        widths = history_widths(max_history) if fixed_shapes else None
        self.train_set = SequenceSamples(
            *training_samples(split.train, max_history, sliding_window), widths=widths
        )
        n = len(split.valid[1])
        users = np.arange(n)
        if val_users and val_users < n:  # a fixed random subset for per-epoch model selection
            users = np.sort(np.random.default_rng(seed).choice(n, val_users, replace=False))
        seen = np.unique(np.concatenate(split.train))
        self.valid_set = SequenceSamples(
            users, [split.valid[0][u] for u in users], split.valid[1][users], seen, widths
        )
        self.seen_items = seen  # the warm items: seen in training sequences
        self.full_valid_set = SequenceSamples(np.arange(n), *split.valid, seen, widths)
        self.test_set = SequenceSamples(np.arange(n), *split.test, seen, widths)

    def setup(self, stage: str) -> None:
        """On the fixed-shape path, keep the samples on the trainer's device (a GPU): no copy
        of each batch from the host."""
        if self.fixed_shapes and self.trainer is not None:
            device = self.trainer.strategy.root_device
            for data in (self.train_set, self.valid_set, self.full_valid_set, self.test_set):
                data.to(device)

    def _loader(self, data: SequenceSamples, train: bool) -> DataLoader:
        size = self.batch_size if train else self.eval_batch_size
        pool = 64 if self.bucket else 1
        full = train and self.fixed_shapes
        sampler = LengthBucketSampler(data.lengths, size, train, self.seed, pool, full_batches=full)
        return BucketLoader(data, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.valid_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def full_val_dataloader(self) -> DataLoader:
        return self._loader(self.full_valid_set, train=False)
