"""Semantic IDs: the codes each item gets, and how colliding codes become item ids."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from grid.errors import GridError

COLLISION_STRATEGIES = ("dedup", "random", "balanced", "none")


@dataclass
class SemanticIDs:
    """Per-item codes `[num_items, length]`; position `l` takes values in `[0, vocab_sizes[l])`.

    `ordered=False` marks codes that form an unordered set (OPQ), so a generator may predict
    them in any order. Items may share a SID (collision strategy 'random'): retrieval of a SID
    then picks one of its items at random.
    """

    codes: np.ndarray
    vocab_sizes: tuple[int, ...]
    ordered: bool = True
    unique_codes: np.ndarray = field(init=False, repr=False)
    item_group: np.ndarray = field(init=False, repr=False)  # item -> row of unique_codes

    def __post_init__(self):
        self.codes = np.ascontiguousarray(self.codes, dtype=np.int64)
        self.vocab_sizes = tuple(int(v) for v in self.vocab_sizes)
        if self.codes.ndim != 2 or self.codes.shape[1] != len(self.vocab_sizes):
            raise ValueError(
                f"codes {self.codes.shape} do not match vocab sizes {self.vocab_sizes}"
            )
        if (self.codes < 0).any() or (self.codes >= np.array(self.vocab_sizes)).any():
            raise ValueError("codes fall outside their vocabularies")
        self.unique_codes, self.item_group = np.unique(self.codes, axis=0, return_inverse=True)
        self.item_group = self.item_group.reshape(-1)
        order = np.argsort(self.item_group, kind="stable")
        counts = np.bincount(self.item_group, minlength=len(self.unique_codes))
        self._members = order  # items sorted by group
        self._offsets = np.concatenate([[0], np.cumsum(counts)])

    @classmethod
    def load(cls, path) -> SemanticIDs:
        """Read a `sids.npz` (codes, vocab_sizes, ordered) as the tokenizer stage writes it."""
        saved = np.load(path)
        return cls(saved["codes"], tuple(saved["vocab_sizes"]), bool(saved["ordered"]))

    @property
    def num_items(self) -> int:
        return len(self.codes)

    @property
    def length(self) -> int:
        return len(self.vocab_sizes)

    @cached_property
    def digest(self) -> str:
        """A fingerprint of the codes and vocabularies (what a checkpoint was trained on)."""
        h = hashlib.sha256(np.array(self.vocab_sizes, dtype=np.int64).tobytes())
        h.update(self.codes.tobytes())
        return h.hexdigest()[:16]

    @property
    def num_unique(self) -> int:
        return len(self.unique_codes)

    @property
    def group_sizes(self) -> np.ndarray:
        return np.diff(self._offsets)

    def members(self, group: int) -> np.ndarray:
        """Items that share the SID `unique_codes[group]`."""
        return self._members[self._offsets[group] : self._offsets[group + 1]]

    def pick_items(
        self, groups: torch.Tensor, users: torch.Tensor | None = None, seed: int = 0
    ) -> torch.Tensor:
        """Map unique-SID rows `[B, n]` to items; where several items share a SID, a member
        drawn uniformly by a hash of (seed, user, SID), so a user's draw is the same whatever
        the batch or process (`users [B]`; None: user 0 for every row).

        Entries < 0 (no SID decoded) stay -1.
        """
        g = groups.cpu().numpy()
        valid = g >= 0
        gv = np.where(valid, g, 0)
        sizes = self.group_sizes[gv]
        user = np.zeros(len(g), dtype=np.int64) if users is None else users.cpu().numpy()
        u = hash_uniform(np.int64(seed), user[:, None], gv)
        pick = np.minimum((u * sizes).astype(np.int64), sizes - 1)
        items = self._members[self._offsets[gv] + pick]
        return torch.as_tensor(np.where(valid, items, -1), device=groups.device)


def hash_uniform(*keys: np.ndarray) -> np.ndarray:
    """Floats in [0, 1), one per element of the broadcast integer `keys`, from SplitMix64's
    mixer: the same keys always give the same draw, neighbouring keys unrelated ones."""
    x = np.zeros(np.broadcast_shapes(*(np.shape(k) for k in keys)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for key in keys:
            x = x + np.asarray(key).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


def deduplicate(codes: np.ndarray) -> np.ndarray:
    """TIGER's fix: append a digit numbering the items that share a SID (0 for unique ones)."""
    _, inverse = np.unique(codes, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    sorted_groups = inverse[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_groups)) + 1]
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    digit = np.empty(len(codes), dtype=np.int64)
    digit[order] = rank
    return np.concatenate([codes, digit[:, None]], axis=1)


def assign_sids(
    codes: np.ndarray, vocab_sizes, strategy: str = "dedup", ordered: bool = True
) -> SemanticIDs:
    """Turn a tokenizer's codes into SemanticIDs under a collision strategy."""
    if strategy == "dedup":
        codes = deduplicate(codes)
        return SemanticIDs(codes, (*vocab_sizes, int(codes[:, -1].max()) + 1), ordered)
    if strategy == "random" or (strategy == "none" and not ordered):
        # unordered codes scored item by item (RPG): items sharing a SID stay tied
        return SemanticIDs(codes, tuple(vocab_sizes), ordered)
    if strategy == "balanced":  # the tokenizer already made the codes collision-free
        sids = SemanticIDs(codes, tuple(vocab_sizes), ordered)
        if sids.num_unique < sids.num_items:
            raise GridError("balanced codes still collide; use collisions=dedup")
        return sids
    raise GridError(
        f"collision strategy {strategy!r} is not available here; choose one of "
        f"{list(COLLISION_STRATEGIES)} that the tokenizer supports"
    )
