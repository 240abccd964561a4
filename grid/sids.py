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
    _tables: dict = field(init=False, repr=False, default_factory=dict)  # `_device_tables`

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

        Runs on the groups' device without reading anything back. Entries < 0 (no SID) stay -1.
        """
        members, offsets = self._device_tables(groups.device)
        g = groups.clamp(min=0)
        if self.num_unique == self.num_items:  # no SID is shared: nothing to draw
            return torch.where(groups >= 0, members[offsets[g]], -1)
        first, sizes = offsets[g], offsets[g + 1] - offsets[g]
        user = torch.zeros(len(g), dtype=torch.long, device=g.device) if users is None else users
        u = hash_uniform(seed, user.to(g.device)[:, None], g)
        pick = torch.minimum((u * sizes).long(), sizes - 1)
        return torch.where(groups >= 0, members[first + pick], -1)

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Items sorted by SID and each SID's offset into them, copied to `device` once."""
        if device not in self._tables:
            self._tables[device] = (
                torch.as_tensor(self._members, device=device),
                torch.as_tensor(self._offsets, device=device),
            )
        return self._tables[device]


_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(value: int) -> int:
    """A 64-bit unsigned value as the int64 with the same bits."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x, bits: int):
    """Logical right shift of 64-bit patterns (torch's `>>` on int64 extends the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash_uniform(*keys: torch.Tensor | int) -> torch.Tensor:
    """Float64s in [0, 1), one per element of the broadcast integer `keys`, from SplitMix64's
    mixer on 64-bit patterns (int64 arithmetic wraps as uint64 does): the same keys always give
    the same draw on any device, neighbouring keys unrelated ones. Leading int keys (a seed)
    are mixed on the host."""
    x: torch.Tensor | int = 0
    for key in keys:
        if isinstance(x, int) and isinstance(key, int):  # exact on Python ints, then as int64
            x = (x + key + _GOLDEN) & ((1 << 64) - 1)
            x = (x ^ (x >> 30)) * _MIX1 & ((1 << 64) - 1)
            x = (x ^ (x >> 27)) * _MIX2 & ((1 << 64) - 1)
            x = _int64(x ^ (x >> 31))
            continue
        x = x + key + _int64(_GOLDEN)
        x = (x ^ _shift_right(x, 30)) * _int64(_MIX1)
        x = (x ^ _shift_right(x, 27)) * _int64(_MIX2)
        x = x ^ _shift_right(x, 31)
    return _shift_right(torch.as_tensor(x), 11).double() * 2.0**-53


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
