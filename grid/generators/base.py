"""What every generator shares: full-ranking evaluation, inference timing, checkpoint checks."""

from __future__ import annotations

import logging
import math
import time
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn

from grid.errors import GridError
from grid.metrics import KS, RankingTotals
from grid.sids import SemanticIDs

log = logging.getLogger(__name__)

TOP_K_BLOCK = 64  # items summarised by their maximum in `top_k`
NO_ITEM = -1  # a ranked list's id where fewer than k items were found
INVALID_SID = -2  # `recommend_scored`'s id for a decoded SID that is no item's (free decoding)


@contextmanager
def matmul_precision(precision: str) -> Iterator[None]:
    """`torch.set_float32_matmul_precision(precision)` inside the block, restored after it."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def bf16_matmuls(enabled: bool = True) -> AbstractContextManager:
    """float32 matmuls computed from bf16-rounded inputs but accumulated and returned in float32
    (`torch.set_float32_matmul_precision("medium")`: oneDNN's bf32 on CPUs with bf16 dot
    products, TF32 on GPUs): bf16 speed without rounding the results to bf16, which would tie
    scores that ranking must tell apart. Inside a compiled graph it changes nothing: the global
    setting cannot be traced, and the graph keeps the precision in force (`high`: TF32)."""
    if not enabled or torch.compiler.is_compiling():
        return nullcontext()
    return matmul_precision("medium")


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and indices `[B, k]` of each row's k largest `scores [B, n]`, best first.

    The values of `scores.topk(k)`, found through the maxima of blocks of `TOP_K_BLOCK` items:
    only the k blocks with the largest maxima can hold a row's top k (ties in any order).
    `scores` may be user-major or the transposed view of item-major `[n, B]` scores; the block
    maxima are reduced in memory order either way, so neither layout is copied.
    """
    B, n = scores.shape
    k, c = min(k, n), TOP_K_BLOCK
    blocks = n // c
    if blocks <= k:
        return scores.topk(k, dim=1)
    head = scores[:, : blocks * c]
    if scores.stride(1) == 1:
        maxima = head.unflatten(1, (blocks, c)).amax(2)
    else:  # item-major: reduce over rows of the `[n, B]` memory, users stay contiguous
        maxima = head.T.view(blocks, c, B).amax(1).T
    best = maxima.topk(k, dim=1).indices
    cols = (best[..., None] * c + torch.arange(c, device=scores.device)).flatten(1)
    if blocks * c < n:  # the last, partial block is always a candidate
        tail = torch.arange(blocks * c, n, device=scores.device).expand(B, -1)
        cols = torch.cat([cols, tail], dim=1)
    top = scores.gather(1, cols).topk(k, dim=1)
    return top.values, cols.gather(1, top.indices)


def running_top_k(
    blocks: Iterable[tuple[int, torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and item ids `[B, min(k, n)]` of each row's k best of n items, best first, from
    blocks of scores `(start, [B, b])` of items `start .. start + b - 1`: each block's top-k is
    merged into the running top-k, so only one block of scores is held at a time."""
    best = None
    for start, scores in blocks:
        values, ids = top_k(scores, k)
        ids = ids + start
        if best is not None:
            values, ids = torch.cat([best[0], values], 1), torch.cat([best[1], ids], 1)
            top = values.topk(min(k, values.shape[1]), dim=1)
            values, ids = top.values, ids.gather(1, top.indices)
        best = values, ids
    return best


def pad_ranked(
    ids: torch.Tensor, scores: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranked ids and their scores `[B, <= k]` widened to `[B, k]` with id NO_ITEM and score
    -inf where a list runs short."""
    if ids.shape[1] >= k:
        return ids, scores
    pad = (0, k - ids.shape[1])
    return F.pad(ids, pad, value=NO_ITEM), F.pad(scores, pad, value=float("-inf"))


def top_k_scored(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item ids and scores `[B, k]` of each row's k best `scores [B, num_items]`, best first;
    -1 (score -inf) past the catalogue's end."""
    values, ids = top_k(scores, k)
    return pad_ranked(ids, values, k)


def top_k_items(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Item ids `[B, k]` of each row's k best `scores [B, num_items]`, best first; -1 past the
    catalogue's end."""
    return top_k_scored(scores, k)[0]


@dataclass
class PipelineInputs:
    """What the earlier stages hand a generator; each generator takes the parts it needs."""

    num_items: int
    num_users: int
    train_sequences: list[np.ndarray]
    sids: SemanticIDs | None = None
    item_embeddings: np.ndarray | None = None
    cf_embeddings: np.ndarray | None = None  # `generator.cf_encoder`'s, when consumed


class Recommender(L.LightningModule):
    """A LightningModule that ranks items for a batch of histories.

    Subclasses implement `recommend_scored(batch, k)` (and `training_step` when `trainable`).
    A batch holds `user [B]`, `history [B, T]` (item ids, right-padded with -1), `length [B]`
    and `target [B]`, and in evaluation `warm [B]` (target seen in training). Validation and test
    compute Recall@K and NDCG@K over all items (overall, warm and cold), coverage and entropy.

    `packed=False` is the fixed-shape training path (the default on GPUs): transformer layers
    run the padded grid instead of packing real tokens, dropout and optimizer steps use torch's
    fused kernels, and no training step reads a value back to the host.
    """

    trainable: bool = True
    # The stage outputs it reads ("embeddings", "sids", "cf_embeddings"): only these stages run
    # and key the model.
    consumes: frozenset[str] = frozenset({"sids"})
    sids: SemanticIDs | None = None  # the SIDs a model is built on, checked when loading weights
    # bool `[num_items]`: items seen in training; set, tests also rank each item group alone
    # (`warm_items/`, `cold_items/`) where `catalogue_scores` gives scores or a generator
    # overrides `_item_groups` (TIGER decodes among each group's SIDs)
    warm_items: torch.Tensor | None = None
    # float `[num_items, categories]` (`grid.metrics.category_matrix`): adds category_entropy@K
    item_categories: torch.Tensor | None = None

    @classmethod
    def check_params(cls, **params) -> None:
        """Raise GridError naming the first invalid field of the generator config's `params`;
        the runner calls it before the costly stages. No checks by default."""

    @classmethod
    def build(cls, inputs: PipelineInputs, **params) -> Recommender:
        """Construct from the pipeline's inputs and the generator config's fields."""
        return cls(num_items=inputs.num_items, **params)

    def __init__(self, num_items: int, ks: tuple[int, ...] = KS, packed: bool = True):
        super().__init__()
        self.num_items, self.ks, self.packed = num_items, tuple(ks), packed
        self._totals = RankingTotals(num_items, self.ks)
        self._users = 0
        self._infer_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # GPU timing
        self.test_per_user: dict[str, np.ndarray] = {}  # per-user test rows (per_user.npz)
        # (user, ids, scores) of each evaluated batch, when set to a list
        self.recorded: list[tuple[torch.Tensor, ...]] | None = None

    @property
    def selecting(self) -> bool:
        """True while Lightning validates inside `fit`: model selection and early stopping."""
        state = self._trainer.state if self._trainer is not None else None
        return (
            state is not None
            and state.fn == TrainerFn.FITTING
            and state.stage is not None
            and state.stage.evaluating
        )

    def chooses_on_validation(self) -> bool:
        """True when validation sets what inference uses (SETRec's beta): test only after it."""
        return False

    def selection_decoding(self) -> dict | None:
        """The fixed inference settings used while `selecting`; None: `recommend` as configured."""
        return None

    def optimizer(self, cls: type = torch.optim.AdamW, **kwargs) -> torch.optim.Optimizer:
        """`cls` (Adam or AdamW) over all parameters; on the fixed-shape path its fused kernel,
        whose step counts stay on the device (the others read them on the host every step)."""
        if not self.packed:
            kwargs = {**kwargs, "foreach": None, "fused": True}
        return cls(self.parameters(), **kwargs)

    def with_schedule(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: float = 0,
        warmup_ratio: float = 0.0,
        schedule_epochs: float | None = None,
    ) -> dict:
        """`configure_optimizers`' answer for `optimizer` under a linear warm-up (`warmup_steps`,
        or `warmup_ratio` of the schedule) and then a cosine decay to 0 over the trainer's
        budget, or over `schedule_epochs` epochs when set (HF's cosine schedule with warm-up)."""
        total = self.trainer.estimated_stepping_batches
        if schedule_epochs is not None:
            self.trainer.fit_loop.setup_data()  # (a step budget alone does not count batches)
            total = schedule_epochs * self.trainer.num_training_batches
        warmup = warmup_steps or (warmup_ratio * total if math.isfinite(total) else 0)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not math.isfinite(total) or total <= warmup:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / (total - warmup), 1.0)))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch; by default the full-softmax cross-entropy of the
        target among `self.scores(batch)` `[B, num_items]`."""
        return F.cross_entropy(self.scores(batch), batch["target"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log_loss("train/loss", loss, batch, prog_bar=True)
        return loss

    def compile_loss(self, mode: str | None = None) -> None:
        """Compile `self.loss` in place as one graph (the module, and so its state_dict keys,
        stay as they are). If the first compiled call fails, one warning and eager from then on.
        `mode="reduce-overhead"` also replays the graph with CUDA graphs on a GPU."""
        eager = self.loss
        compiled = torch.compile(eager, fullgraph=True, dynamic=False, mode=mode)
        if mode == "reduce-overhead":  # a step's graph outputs live until the next replay only
            replayed = compiled

            def compiled(*args, **kwargs):
                torch.compiler.cudagraph_mark_step_begin()
                return replayed(*args, **kwargs).clone()

        first = True

        def loss(*args, **kwargs):
            nonlocal first
            if not first:
                return compiled(*args, **kwargs)
            try:
                out = compiled(*args, **kwargs)
            except Exception as error:  # no C++ compiler, an unsupported operator, ...
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                log.warning("trainer.compile: compiling the loss failed (%s); eager", reason)
                self.loss = eager
                return eager(*args, **kwargs)
            first = False
            return out

        self.loss = loss

    def log_loss(self, name: str, loss: torch.Tensor, batch: dict, prog_bar: bool = False) -> None:
        """Log a training loss. On the fixed-shape path a copy (a replayed CUDA graph overwrites
        its outputs), never shown in the progress bar, which would read it every step."""
        if not self.packed:
            loss, prog_bar = loss.detach().clone(), False
        self.log(name, loss, prog_bar=prog_bar, batch_size=len(batch["target"]))

    @abstractmethod
    def recommend_scored(
        self, batch: dict[str, torch.Tensor], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Item ids `[B, k]`, best first, and the generator's score of each (float32).

        Where fewer than k items were found the id is NO_ITEM and the score -inf; a decoded SID
        that is no item's (free decoding) is INVALID_SID, after every real item.
        """

    def recommend(self, batch: dict[str, torch.Tensor], k: int) -> torch.Tensor:
        """Item ids `[B, k]`, best first; -1 where fewer than k items were found."""
        return self.recommend_scored(batch, k)[0].clamp(min=NO_ITEM)

    def start_inference(self) -> None:
        """Build what evaluation caches (item tables, search indexes, graphs) for calls of
        `recommend_scored` outside a Trainer; weights must not change afterwards."""
        self._eval_start()

    def catalogue_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Every item's score `[B, num_items]` (higher: better) as the model ranks them, or None
        for a generator that does not score items one by one (beam search decodes prefixes)."""
        return None

    def _item_groups(self, batch: dict[str, torch.Tensor]) -> None:
        """Rank the warm and the cold items apart (the other group's scores masked out) for the
        users whose target is in the group: SETRec's warm/cold evaluation."""
        scores = self.catalogue_scores(batch)
        if scores is None:
            return
        warm_items_count = int(self.warm_items.sum())  # (kept on the host: no device sync)
        warm_items = self.warm_items.to(scores.device)
        for prefix, items, users, count in (
            ("warm_items/", warm_items, batch["warm"], warm_items_count),
            ("cold_items/", ~warm_items, ~batch["warm"], self.num_items - warm_items_count),
        ):
            masked = scores.masked_fill(~items, float("-inf"))
            ranked = top_k_items(masked, max(self.ks))
            # a group smaller than K ranks the other group's items last: never a hit
            self._totals.update_items(prefix, ranked, batch["target"], users, count)

    # --- evaluation ---------------------------------------------------------------------------

    def _eval_step(self, batch: dict[str, torch.Tensor]) -> None:
        """Rank a batch, time it and add it to the totals. On a GPU the time is that of CUDA
        events around `recommend`, read once per evaluation: no host sync per batch."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            ranked, scores = self.recommend_scored(batch, max(self.ks))
            end.record()
            self._events.append((start, end))
        else:
            start = time.perf_counter()
            ranked, scores = self.recommend_scored(batch, max(self.ks))
            self._infer_seconds += time.perf_counter() - start
        self._totals.update(ranked, batch["target"], batch.get("warm"), batch.get("user"))
        self._users += len(batch["target"])
        self._record(batch, ranked, scores)
        testing = self._trainer is not None and self._trainer.testing
        if testing and self.warm_items is not None and "warm" in batch:
            with torch.no_grad():
                self._item_groups(batch)

    def _record(self, batch: dict[str, torch.Tensor], ranked, scores) -> None:
        """Keep the batch's ranked lists while `recorded` is a list (`grid recommend --split`)."""
        if self.recorded is not None:
            self.recorded.append((batch["user"].cpu(), ranked.cpu(), scores.cpu()))

    def _eval_start(self) -> None:
        testing = self._trainer is not None and self._trainer.testing  # keep per-user rows
        self._totals = RankingTotals(
            self.num_items, self.ks, self.device, testing, categories=self.item_categories
        )
        self._users, self._infer_seconds = 0, 0.0
        self._events = []
        if self.recorded is not None:
            self.recorded = []

    def _event_seconds(self) -> float:
        """Seconds between the recorded CUDA events, after one synchronisation."""
        if self._events:
            torch.cuda.synchronize()
            self._infer_seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1000
            self._events = []
        return self._infer_seconds

    def _eval_end(self, stage: str) -> None:
        """Sum the totals over DDP processes (each scored its own users) and log the metrics.

        Inference time with several devices is the slowest process's seconds, so users/s is
        the throughput of all `infer/devices` devices together.
        """
        reduce = self.trainer.strategy.reduce
        self._totals.reduce(lambda total: reduce(total.to(self.device), reduce_op="sum"))
        for name, value in sorted(self._totals.results().items()):
            self.log(f"{stage}/{name}", value, sync_dist=False)
        if stage == "test":
            users = float(self._totals.sums.get("users", 0.0))
            seconds = torch.tensor(self._event_seconds(), dtype=torch.float64, device=self.device)
            seconds = float(reduce(seconds, reduce_op="max"))
            self.log("infer/devices", float(self.trainer.world_size))
            # This process's users only: under DDP, gather them before rank 0 writes them.
            self.test_per_user = self._totals.per_user_results()
            self.log("infer/seconds", seconds)
            self.log("infer/ms_per_user", 1000.0 * seconds / max(users, 1))
            self.log("infer/users_per_s", users / max(seconds, 1e-9))

    # --- checkpoints ---------------------------------------------------------------------------

    def checkpoint_signature(self) -> dict:
        """What a checkpoint must match to be loaded: generator, catalogue and SID vocabulary."""
        sids = self.sids
        return {
            "generator": type(self).__name__,
            "num_items": self.num_items,
            "sid_vocab_sizes": None if sids is None else list(sids.vocab_sizes),
            "sid_digest": None if sids is None else sids.digest,
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["grid"] = self.checkpoint_signature()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("grid")
        if saved is None:  # written before signatures existed: nothing to compare
            return
        ours = self.checkpoint_signature()
        for field, what in (
            ("generator", "generator"),
            ("num_items", "catalogue size"),
            ("sid_vocab_sizes", "SID vocabulary sizes"),
            ("sid_digest", "semantic IDs"),
        ):
            if saved.get(field) != ours[field]:
                raise GridError(
                    f"checkpoint made for {what} {saved.get(field)} cannot load into a model "
                    f"with {ours[field]}; load it with the generator and SIDs it was trained on"
                )

    def load_checkpoint(self, path) -> dict:
        """Load weights from a Lightning checkpoint after checking its signature; return it."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        self.on_load_checkpoint(checkpoint)
        self.load_state_dict(checkpoint["state_dict"])
        return checkpoint

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
