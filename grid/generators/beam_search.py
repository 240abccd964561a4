"""Decoding semantic IDs: prefix tables, batched beam search, exhaustive top-K."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grid.errors import GridError

# step(level, tokens, parents) -> log-probs [B, W, vocab_sizes[level]]. `tokens` [B, W] are the
# codes chosen at the previous level (None at level 0); `parents` [B, W] the beam each new beam
# extends, so the caller can reorder its KV cache before feeding `tokens`.
StepFn = Callable[[int, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def available_memory() -> int | None:
    """Bytes of memory the OS can still hand out (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


class PrefixTable(nn.Module):
    """Valid SID prefixes as sorted child lists (CSR): memory linear in the number of SIDs.

    Prefixes of each length are numbered in lexicographic order (the single empty prefix is 0;
    full SIDs are rows of `unique_codes`, i.e. SID groups). The children of prefix p at level l
    are then the consecutive ids `start[l][p] .. start[l][p + 1] - 1`, and `key[l][j] =
    parent * vocab + code` is sorted, so extending a prefix by one code is a binary search.
    """

    def __init__(self, unique_codes: np.ndarray, vocab_sizes: tuple[int, ...]):
        super().__init__()
        codes = np.asarray(unique_codes, dtype=np.int64)
        need, free = self.bytes_needed(*codes.shape), available_memory()
        if free is not None and need > free:
            raise GridError(
                f"constrained decoding over {len(codes):,} SIDs of {codes.shape[1]} codes needs "
                f"about {_gib(need)} of memory but {_gib(free)} is free: use "
                "a machine with more memory, shorter SIDs, or generator.decoding=free"
            )
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        self.fanout = []  # the most children any prefix of each level has
        parent, num_prefixes = np.zeros(len(codes), dtype=np.int64), 1
        for level, vocab in enumerate(self.vocab_sizes):
            key, child = np.unique(parent * vocab + codes[:, level], return_inverse=True)
            start = np.searchsorted(key, np.arange(num_prefixes + 1) * vocab)
            self.fanout.append(int(np.diff(start).max()))
            self.register_buffer(f"key_{level}", torch.as_tensor(key), persistent=False)
            self.register_buffer(f"start_{level}", torch.as_tensor(start), persistent=False)
            parent, num_prefixes = child.reshape(-1), len(key)
        if num_prefixes != len(codes) or not np.array_equal(parent, np.arange(len(codes))):
            raise ValueError("unique_codes must be distinct rows in lexicographic order")

    @staticmethod
    def bytes_needed(num_sids: int, length: int) -> int:
        """Peak memory of building the tables for `num_sids` SIDs of `length` codes (an upper
        bound): per level an int64 key and start per prefix, plus the codes and sort buffers."""
        return 16 * length * (num_sids + 1) + 8 * length * num_sids + 32 * num_sids

    def extensions(self, level: int, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes `[..., fanout]` that extend prefixes `[...]` validly and the prefix ids
        they lead to; unused slots (and every slot of an invalid prefix -1) hold code `vocab`
        and id -1."""
        key, start = getattr(self, f"key_{level}"), getattr(self, f"start_{level}")
        vocab, slot = self.vocab_sizes[level], torch.arange(self.fanout[level], device=key.device)
        p = prefix.clamp(min=0)
        first, count = start[p], (start[p + 1] - start[p]).masked_fill(prefix < 0, 0)
        used = slot < count.unsqueeze(-1)
        ids = torch.where(used, first.unsqueeze(-1) + slot, -1)
        codes = torch.where(used, key[ids.clamp(min=0)] % vocab, vocab)
        return codes, ids

    def next(self, level: int, prefix: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Ids of prefixes `[...]` extended by `code` `[...]`; -1 where no SID starts that way
        (and once a prefix is invalid it stays -1)."""
        key = getattr(self, f"key_{level}")
        query = prefix.clamp(min=0) * self.vocab_sizes[level] + code
        found = torch.searchsorted(key, query).clamp(max=len(key) - 1)
        return torch.where((prefix >= 0) & (key[found] == query), found, -1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """SID group of each code row `[..., L]`, or -1 for codes that are no item's SID."""
        prefix = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for level in range(len(self.vocab_sizes)):
            prefix = self.next(level, prefix, codes[..., level])
        return prefix


class ConstrainedBeamSearch:
    """Batched beam search over SID levels; `constrained` keeps only valid prefixes.

    Constrained beams are extended only by their valid children (at most `fanout` each), so
    the top-k runs over far fewer candidates than beams x vocabulary. Without constraints (free
    decoding) beams may end on codes that are no SID; they come back as group -1 so the caller
    can drop and count them.
    """

    def __init__(self, table: PrefixTable, width: int, constrained: bool = True):
        self.table, self.width, self.constrained = table, width, constrained

    @torch.no_grad()
    def search(self, step: StepFn, batch_size: int, device=None) -> tuple[torch.Tensor, ...]:
        """Groups `[B, width]` (-1: none) and their log-likelihoods `[B, width]`, best first."""
        prefix = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        scores = torch.zeros(batch_size, 1, device=device)
        tokens = parents = None
        for level, vocab in enumerate(self.table.vocab_sizes):
            logp = step(level, tokens, parents).float()
            if self.constrained:  # candidates: each beam's valid children only
                codes, ids = self.table.extensions(level, prefix)
                codes = codes.clamp(max=vocab - 1)  # unused slots: any code, scored -inf
                cand = logp.gather(2, codes).masked_fill(ids < 0, -torch.inf)
                width = codes.shape[2]
            else:
                cand, width = logp, vocab
            cand = (cand + scores.unsqueeze(-1)).flatten(1)
            scores, flat = cand.topk(min(self.width, cand.shape[1]), dim=1)
            parents = flat // width
            if self.constrained:
                tokens = codes.flatten(1).gather(1, flat)
                prefix = ids.flatten(1).gather(1, flat)
            else:
                tokens = flat % width
                prefix = self.table.next(level, prefix.gather(1, parents), tokens)
        groups = prefix.masked_fill(scores == float("-inf"), -1)
        missing = self.width - groups.shape[1]  # fewer valid SIDs than beams
        if missing > 0:
            groups = F.pad(groups, (0, missing), value=-1)
            scores = F.pad(scores, (0, missing), value=float("-inf"))
        return groups, scores


class ExhaustiveSearch:
    """The oracle: scores every unique SID's full log-likelihood and returns the exact top-K."""

    def __init__(self, unique_codes: torch.Tensor, chunk: int = 4096):
        self.unique_codes, self.chunk = unique_codes, chunk

    @torch.no_grad()
    def search(
        self, score: Callable[[torch.Tensor], torch.Tensor], k: int
    ) -> tuple[torch.Tensor, ...]:
        """`score(codes [C, L]) -> [B, C]` log-likelihoods; returns groups and scores `[B, k]`."""
        parts = [score(c) for c in self.unique_codes.split(self.chunk)]
        scores = torch.cat(parts, dim=1)
        scores, groups = scores.topk(min(k, scores.shape[1]), dim=1)
        return groups, scores
