"""Decoding semantic IDs: prefix tables, batched beam search, exhaustive top-K."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

# step(level, tokens, parents) -> log-probs [B, W, vocab_sizes[level]]. `tokens` [B, W] are the
# codes chosen at the previous level (None at level 0); `parents` [B, W] the beam each new beam
# extends, so the caller can reorder its KV cache before feeding `tokens`.
StepFn = Callable[[int, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


class PrefixTable(nn.Module):
    """Dense transition tables over valid SID prefixes.

    `next[l][p, c]` is the id of prefix p (length l) extended by code c, or -1 when no SID starts
    that way. The single length-0 prefix has id 0; at the last level the id is the row of
    `unique_codes`, i.e. the SID group.
    """

    def __init__(self, unique_codes: np.ndarray, vocab_sizes: tuple[int, ...]):
        super().__init__()
        codes = np.asarray(unique_codes, dtype=np.int64)
        self.vocab_sizes = tuple(int(v) for v in vocab_sizes)
        parent = np.zeros(len(codes), dtype=np.int64)  # prefix id of each SID at the current level
        num_prefixes = 1
        for level, vocab in enumerate(self.vocab_sizes):
            if level == len(self.vocab_sizes) - 1:
                child, count = np.arange(len(codes)), len(codes)  # np.unique keeps rows sorted
            else:
                _, child = np.unique(codes[:, : level + 1], axis=0, return_inverse=True)
                child, count = child.reshape(-1), int(child.max()) + 1
            table = np.full((num_prefixes, vocab), -1, dtype=np.int64)
            table[parent, codes[:, level]] = child
            penalty = np.where(table >= 0, 0.0, -np.inf).astype(np.float32)
            self.register_buffer(f"next_{level}", torch.as_tensor(table), persistent=False)
            self.register_buffer(f"penalty_{level}", torch.as_tensor(penalty), persistent=False)
            parent, num_prefixes = child, count

    def next(self, level: int, prefix: torch.Tensor, code: torch.Tensor | None = None):
        """Ids of prefixes `[...]` extended by `code` `[...]`, or by every code `[..., vocab]`.

        -1 marks prefixes that no SID starts with (and stays -1 once a prefix is invalid).
        """
        table = getattr(self, f"next_{level}")
        if code is None:
            return table[prefix.clamp(min=0)].masked_fill(prefix.unsqueeze(-1) < 0, -1)
        return torch.where(prefix >= 0, table[prefix.clamp(min=0), code], -1)

    def penalty(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        """0 for codes that extend a prefix `[...]` into a valid one, else -inf: `[..., vocab]`."""
        table = getattr(self, f"penalty_{level}")
        return table.index_select(0, prefix.clamp(min=0).flatten()).view(*prefix.shape, -1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """SID group of each code row `[..., L]`, or -1 for codes that are no item's SID."""
        prefix = torch.zeros(codes.shape[:-1], dtype=torch.long, device=codes.device)
        for level in range(len(self.vocab_sizes)):
            prefix = self.next(level, prefix, codes[..., level])
        return prefix


class ConstrainedBeamSearch:
    """Batched beam search over SID levels; `constrained` keeps only valid prefixes.

    Without constraints (free decoding) beams may end on codes that are no SID; they come back
    as group -1 so the caller can drop and count them.
    """

    def __init__(self, table: PrefixTable, width: int, constrained: bool = True):
        self.table, self.width, self.constrained = table, width, constrained

    @torch.no_grad()
    def search(self, step: StepFn, batch_size: int, device=None) -> tuple[torch.Tensor, ...]:
        """Groups `[B, W]` (-1: none) and their log-likelihoods `[B, W]`, best first."""
        prefix = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        scores = torch.zeros(batch_size, 1, device=device)
        tokens = parents = None
        for level, vocab in enumerate(self.table.vocab_sizes):
            cand = step(level, tokens, parents).float() + scores.unsqueeze(-1)
            if self.constrained:  # dead beams (-inf) may pick any row: they stay -inf
                cand += self.table.penalty(level, prefix)
            cand = cand.flatten(1)
            scores, flat = cand.topk(min(self.width, cand.shape[1]), dim=1)
            parents, tokens = flat // vocab, flat % vocab
            prefix = self.table.next(level, prefix.gather(1, parents), tokens)
        groups = prefix.masked_fill(scores == float("-inf"), -1)
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
