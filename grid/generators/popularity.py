"""The popularity baseline: every user gets the items seen most often in training."""

from __future__ import annotations

import numpy as np
import torch

from grid.generators.base import PipelineInputs, Recommender, pad_ranked


class Popularity(Recommender):
    """Ranks items by their number of training interactions."""

    trainable = False
    consumes = frozenset()

    @classmethod
    def build(cls, inputs: PipelineInputs, **params) -> Popularity:
        return cls(inputs.num_items, inputs.train_sequences, **params)

    def __init__(self, num_items: int, train_sequences: list[np.ndarray], **kwargs):
        super().__init__(num_items, **kwargs)
        counts = np.bincount(np.concatenate(train_sequences), minlength=num_items)
        self.register_buffer("ranking", torch.as_tensor(np.argsort(-counts, kind="stable")))
        self.register_buffer("counts", torch.as_tensor(counts, dtype=torch.float32))

    def recommend_scored(
        self, batch: dict[str, torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most popular items, scored by their training interactions."""
        top = self.ranking[:k]
        top, scores = pad_ranked(top[None], self.counts[top][None], k)
        B = len(batch["length"])
        return top.expand(B, k), scores.expand(B, k)

    def catalogue_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Minus each item's place in the popularity ranking (the same for every user)."""
        place = torch.empty_like(self.ranking)
        place[self.ranking] = torch.arange(self.num_items, device=self.ranking.device)
        return (-place).float().expand(len(batch["target"]), -1)
