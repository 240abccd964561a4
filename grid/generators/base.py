"""What every generator shares: full-ranking evaluation and inference timing."""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from grid.metrics import KS, rank_metrics
from grid.sids import SemanticIDs


@dataclass
class PipelineInputs:
    """What the earlier stages hand a generator; each generator takes the parts it needs."""

    num_items: int
    num_users: int
    train_sequences: list[np.ndarray]
    sids: SemanticIDs | None = None
    item_embeddings: np.ndarray | None = None
    cf_embeddings: np.ndarray | None = None  # `generator.cf_encoder`'s, for `needs_cf` generators


class Recommender(L.LightningModule):
    """A LightningModule that ranks items for a batch of histories.

    Subclasses implement `recommend(batch, k)` (and `training_step` when `trainable`). A batch
    holds `user [B]`, `history [B, T]` (item ids, right-padded with -1), `length [B]` and
    `target [B]`. Validation and test compute Recall@K and NDCG@K over all items.
    """

    trainable: bool = True
    needs_sids: bool = True  # False: the runner skips the tokenizer stage
    needs_cf: bool = False  # True: the runner also embeds items with `generator.cf_encoder`

    @classmethod
    def build(cls, inputs: PipelineInputs, **params) -> Recommender:
        """Construct from the pipeline's inputs and the generator config's fields."""
        return cls(num_items=inputs.num_items, **params)

    def __init__(self, num_items: int, ks: tuple[int, ...] = KS):
        super().__init__()
        self.num_items, self.ks = num_items, tuple(ks)
        self._sums: dict[str, torch.Tensor] = {}
        self._users = 0
        self._infer_seconds = 0.0

    @abstractmethod
    def recommend(self, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """Item ids `[B, k]`, best first; -1 where fewer than k items were found."""

    # --- evaluation ---------------------------------------------------------------------------

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ranked = self.recommend(batch, max(self.ks))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._infer_seconds += time.perf_counter() - start
        for name, values in rank_metrics(ranked, batch["target"], self.ks).items():
            self._sums[name] = self._sums.get(name, 0.0) + values.sum()
        self._users += len(batch["target"])

    def _eval_start(self) -> None:
        self._sums, self._users, self._infer_seconds = {}, 0, 0.0

    def _eval_end(self, stage: str) -> None:
        reduce = self.trainer.strategy.reduce
        users = reduce(torch.tensor(float(self._users), device=self.device), reduce_op="sum")
        for name, total in sorted(self._sums.items()):
            total = reduce(torch.as_tensor(total, device=self.device), reduce_op="sum")
            self.log(f"{stage}/{name}", total / users, sync_dist=False)
        if stage == "test":
            seconds = float(self._infer_seconds)
            self.log("infer/seconds", seconds)
            self.log("infer/ms_per_user", 1000.0 * seconds / max(self._users, 1))
            self.log("infer/users_per_s", self._users / max(seconds, 1e-9))

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch, batch_idx) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("valid")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch, batch_idx) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")
