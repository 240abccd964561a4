"""`grid run`: the cached stages, then a Lightning fit, model selection and a full-ranking test."""

from __future__ import annotations

import csv
import ctypes
import io
import json
import logging
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from grid.cache import StageCache, stage_key
from grid.config import to_yaml
from grid.data import SOURCE_FIELDS, SequenceDataModule, Split
from grid.errors import GridError
from grid.generators import GENERATORS, Popularity, Recommender
from grid.metrics import KS, category_matrix
from grid.pipeline import Stages, component, params, prepare
from grid.tracking import log_final, make_logger

log = logging.getLogger(__name__)

# Generator fields that change only inference, so a sweep over them reuses one trained model.
INFERENCE_FIELDS = ("decoding", "beam_width", "search", "n_edges", "steps")
TRAINER_EVAL_FIELDS = (
    "eval_batch_size",
    "logger",
    "wandb_project",
    "wandb_group",
    "wandb_mode",
    "progress_bar",
    "log_every_n_steps",
)
# 2: T5 TIGER; fixed selection decoding. 3: bf16 SimGR, packed-row rounding. 4: RPG states
# scaled before the code matmul
MODEL_STAGE_VERSION = 4
# What a run writes to its folder: a later run in the same folder removes these (and only these).
RUN_FILES = (
    "config.yaml",
    "metrics.json",
    "per_user.npz",
    "stages.json",
    "model.ckpt",
    "selection.json",
    "sids.npz",
    "tokenizer_report.json",
    "logs/metrics.csv",
    "logs/hparams.yaml",
    "ranked_test.jsonl",  # grid recommend --split
    "ranked_valid.jsonl",
)
MATMUL_PRECISION = "high"  # float32 matmuls of training and evaluation (TF32 on GPUs)


def main_process() -> bool:
    """False in the processes a DDP run adds (Lightning re-runs the command in them, or a
    cluster starts them): they train and evaluate their share but write no run files."""
    ranks = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
    return all(int(os.environ[r]) == 0 for r in ranks if os.environ.get(r, "").isdigit())


def check_devices(t: DictConfig) -> None:
    """Fail before any stage runs when `trainer.devices` asks for more GPUs than are visible."""
    wanted, visible = t.devices, torch.cuda.device_count()
    if t.accelerator not in ("auto", "gpu", "cuda") or not isinstance(wanted, int) or wanted < 1:
        return  # -1: all visible devices
    if wanted > visible and (wanted > 1 or t.accelerator != "auto"):  # auto, 1: CPU is fine
        raise GridError(
            f"trainer.devices={wanted} asks for {wanted} GPUs but {visible} are visible; lower "
            f"trainer.devices or set trainer.accelerator=cpu to run {wanted} CPU processes"
        )


def resolve_packed(t: DictConfig) -> bool:
    """`trainer.packed`, null resolved: packed token rows on CPUs, where they win, and the
    fixed-shape path on GPUs (no host syncs, shapes a compiled graph can replay)."""
    if t.packed is not None:
        if not isinstance(t.packed, bool):
            raise GridError(
                f"trainer.packed={t.packed!r} is not true, false or null; give "
                "trainer.packed=false for the fixed-shape path or null to pick by device"
            )
        return t.packed
    cuda = t.accelerator in ("gpu", "cuda") or (
        t.accelerator == "auto" and torch.cuda.is_available()
    )
    return not cuda


def model_key(cfg: DictConfig, stages: Stages) -> str:
    """Cache key of a trained model: the stage outputs its generator consumes, data, generator
    and training settings."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k not in SOURCE_FIELDS}
    generator = {k: v for k, v in params(cfg.generator).items() if k not in INFERENCE_FIELDS}
    trainer = {
        k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if k not in TRAINER_EVAL_FIELDS
    }
    consumes = component(GENERATORS, cfg.generator, "generator").consumes
    upstream = {name: stages.key(name) for name in sorted(consumes)}
    return stage_key(
        "model",
        MODEL_STAGE_VERSION,
        upstream,
        stages.dataset.fingerprint,
        data,
        cfg.generator.name,
        generator,
        trainer,
        cfg.seed,
    )


def _trainer(cfg: DictConfig, out: Path, callbacks=(), logger=False) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.get("num_nodes", 1),
        strategy=t.strategy,
        use_distributed_sampler=False,  # the loaders shard themselves, evaluation unpadded
        precision=t.precision,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        max_time=t.max_time,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        gradient_clip_val=t.get("gradient_clip_val"),
        callbacks=list(callbacks),
        logger=logger,
        default_root_dir=out,
        enable_progress_bar=t.progress_bar,
        log_every_n_steps=t.get("log_every_n_steps", 50),
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _every_process(state: dict) -> dict:
    """A callback's state of every DDP process, for the checkpoint (which the first one writes;
    every process builds it, so this gathers)."""
    if not _distributed():
        return state
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return {"ranks": states}


def _this_process(state: dict) -> dict:
    """This process's part of a state saved by `_every_process`."""
    if "ranks" not in state:
        return state
    return state["ranks"][torch.distributed.get_rank() if _distributed() else 0]


class RandomState(Callback):
    """Keeps the RNG states (dropout) in checkpoints, which Lightning does not, so that a resumed
    run draws what the uninterrupted one would have drawn; under DDP, every process's."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return _every_process(state)

    def load_state_dict(self, state: dict) -> None:
        state = _this_process(state)
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class TrainingSpeed(Callback):
    """Training samples and seconds (data loading included, validation excluded); kept in
    checkpoints, so a resumed run counts its whole training."""

    def __init__(self) -> None:
        self.samples, self.seconds = 0, 0.0
        self._mark = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.seconds += now - self._mark
        self.samples += len(batch["target"])
        self._mark = now

    def state_dict(self) -> dict:
        return _every_process({"samples": self.samples, "seconds": self.seconds})

    def load_state_dict(self, state: dict) -> None:
        state = _this_process(state)
        self.samples, self.seconds = state["samples"], state["seconds"]

    def summary(self, trainer: L.Trainer) -> dict:
        """Samples of all DDP processes over the slowest one's seconds."""
        device = trainer.strategy.root_device

        def across(value: float, op: str) -> float:
            value = torch.tensor(value, dtype=torch.float64, device=device)
            return float(trainer.strategy.reduce(value, reduce_op=op))

        samples, seconds = across(self.samples, "sum"), across(self.seconds, "max")
        return {
            "samples": int(samples),
            "seconds": seconds,
            "samples_per_s": samples / max(seconds, 1e-9),
            "devices": trainer.world_size,
            "epochs": trainer.current_epoch,  # epochs trained (early stopping ends one early)
        }


class CSVHistory(Callback):
    """Keeps the rows of the CSV log (logs/metrics.csv) in checkpoints, so that a resumed run's
    log holds the whole training curve, not only the steps after the interruption."""

    def __init__(self) -> None:
        self.logger, self.restored = None, ""

    def setup(self, trainer, pl_module, stage) -> None:
        csv = [lg for lg in trainer.loggers if isinstance(lg, L.pytorch.loggers.CSVLogger)]
        self.logger = csv[0] if csv and trainer.is_global_zero else None

    def state_dict(self) -> dict:
        if self.logger is None:
            return {"csv": ""}
        self.logger.save()  # the rows logged so far, up to this checkpoint's step
        path = Path(self.logger.experiment.metrics_file_path)
        return {"csv": path.read_text() if path.is_file() else ""}

    def load_state_dict(self, state: dict) -> None:
        self.restored = state.get("csv", "")

    def on_train_start(self, trainer, pl_module) -> None:
        if self.logger is None or not self.restored:
            return
        writer = self.logger.experiment
        Path(writer.metrics_file_path).write_text(self.restored)
        writer.metrics_keys = next(csv.reader(io.StringIO(self.restored)))  # later rows append
        self.restored = ""


@contextmanager
def _interruptible(trainer: L.Trainer) -> Iterator[None]:
    """Raise KeyboardInterrupt for a Ctrl-C that Lightning handled itself (it stops gracefully,
    then exits with 1 and ignores further Ctrl-C)."""
    sigint = signal.getsignal(signal.SIGINT)
    try:
        yield
    except SystemExit:
        if not trainer.interrupted:
            raise
    finally:
        if signal.getsignal(signal.SIGINT) is not sigint:
            signal.signal(signal.SIGINT, sigint)
    if trainer.interrupted:
        raise KeyboardInterrupt


def _fit(cfg: DictConfig, model: Recommender, datamodule, folder: Path, logger) -> Path:
    """Train into `folder`, resuming from last.ckpt if a previous run stopped before the end.

    Call it holding the folder's cache lock. last.ckpt is the whole state (weights, optimizer,
    loop and batch position, RNG) at the latest validation, so a resumed run equals an
    uninterrupted one.
    """
    best, last = folder / "best.ckpt", folder / "last.ckpt"
    if (folder / "DONE").is_file() and best.is_file():
        log.info("trained model %s found in the cache: skipping training", folder.name)
        return best
    folder.mkdir(parents=True, exist_ok=True)
    if last.is_file():
        try:
            torch.load(last, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # truncated or corrupt: any reader error
            log.warning("cannot read %s (%s): training from the start", last, str(e).split("\n")[0])
            last.unlink(missing_ok=True)  # DDP: every process checks it
            best.unlink(missing_ok=True)
    monitor = cfg.trainer.monitor
    callbacks = [
        ModelCheckpoint(
            dirpath=folder,
            filename="best",
            monitor=monitor,
            mode="max",
            save_top_k=1,
            enable_version_counter=False,
        ),
        # No monitor: saved at every validation, improved or not (save_last is not).
        ModelCheckpoint(dirpath=folder, filename="last", enable_version_counter=False),
        EarlyStopping(monitor=monitor, mode="max", patience=cfg.trainer.patience),
        RandomState(),
        CSVHistory(),
        speed := TrainingSpeed(),
    ]
    trainer = _trainer(cfg, folder, callbacks, logger)
    if cfg.trainer.compile:
        model.compile_loss("reduce-overhead" if cfg.trainer.cuda_graphs else None)
    with _interruptible(trainer):
        trainer.fit(model, datamodule=datamodule, ckpt_path=last if last.is_file() else None)
    if not best.is_file():  # no validation ran (e.g. a tiny step budget): keep the final weights
        trainer.save_checkpoint(best)
    summary = speed.summary(trainer)
    if main_process():
        (folder / "training.json").write_text(json.dumps(summary, indent=2))
        (folder / "DONE").write_text("")
    return best


def _selection(cfg: DictConfig, model: Recommender, val_users: int, checkpoint: dict) -> dict:
    """How the checkpoint in use was chosen: monitor, validation users, decoding, best score."""
    states = checkpoint.get("callbacks", {})
    score = next((s["best_model_score"] for k, s in states.items() if "ModelCheckpoint" in k), None)
    return {
        "monitor": cfg.trainer.monitor,
        "val_users": val_users,
        "decoding": model.selection_decoding(),  # null: the generator's configured recommend
        "best_score": None if score is None else float(score),  # null: no validation ran
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
    }


def _evaluate(
    cfg: DictConfig,
    model: Recommender,
    datamodule: SequenceDataModule,
    out: Path,
    logger,
    categories: torch.Tensor | None = None,
) -> dict[str, float]:
    """Validation and test metrics; `categories` (`category_matrix`) adds category entropies."""
    trainer = _trainer(cfg, out, logger=logger)
    model.warm_items = torch.zeros(model.num_items, dtype=torch.bool)
    model.warm_items[datamodule.seen_items] = True
    model.item_categories = categories
    with _interruptible(trainer):
        valid = trainer.validate(model, dataloaders=datamodule.full_val_dataloader(), verbose=False)
        test = trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    return {k: float(v) for k, v in {**valid[0], **test[0]}.items()}


def _write_per_user(out: Path, rows: dict[str, np.ndarray], user_ids: list[str]) -> None:
    """per_user.npz: each test user's internal `user` index, `user_id`, `warm` flag and
    recall@K / ndcg@K, sorted by user; their means are the test metrics."""
    with open(out / "per_user.npz.tmp", "wb") as f:
        np.savez(f, **rows, user_id=np.asarray(user_ids)[rows["user"]])
    os.replace(out / "per_user.npz.tmp", out / "per_user.npz")


def results_table(metrics: dict[str, float], baseline: dict[str, float], ks=(1, 5, 10, 20)) -> str:
    """Recall/NDCG rows for the model and the popularity baseline, valid and test."""
    head = f"{'':24}" + "".join(f"{f'{m}@{k}':>11}" for m in ("recall", "ndcg") for k in ks)
    lines = [head]
    for name, values in (("model", metrics), ("popularity", baseline)):
        for split in ("valid", "test"):
            row = "".join(
                f"{values.get(f'{split}/{m}@{k}', float('nan')):>11.4f}"
                for m in ("recall", "ndcg")
                for k in ks
            )
            lines.append(f"{name + ' ' + split:24}{row}")
    m = {k[5:]: v for k, v in metrics.items() if k.startswith("test/")}
    if "warm_users/users" in m:
        m = {
            k: m.get(k, float("nan")) for k in (*m, "warm_users/recall@10", "cold_users/recall@10")
        }
        lines.append(
            f"model test recall@10, all items ranked: warm users {m['warm_users/recall@10']:.4f} "
            f"({m['warm_users/users']:.0f}), cold users {m['cold_users/recall@10']:.4f} "
            f"({m['cold_users/users']:.0f}), random {m['random_recall@10']:.4f}; "
            f"coverage@10 {m['coverage@10']:.4f}, item entropy@10 {m['item_entropy@10']:.2f}"
        )
    for group in ("warm_items", "cold_items"):
        if f"{group}/items" in m and f"{group}/recall@10" in m:
            lines.append(
                f"model test recall@10, {group.replace('_', ' ')} ranked alone: "
                f"{m[f'{group}/recall@10']:.4f} over {m[f'{group}/items']:.0f} items for "
                f"{m[f'{group}/users']:.0f} users, random {m[f'{group}/random_recall@10']:.4f}"
            )
    if "infer/seconds" in metrics:
        devices = metrics.get("infer/devices", 1)
        lines.append(
            f"inference: {metrics['infer/seconds']:.1f} s over the test set, "
            f"{metrics['infer/users_per_s']:.0f} users/s"
            + (f" on {devices:.0f} devices" if devices > 1 else "")
        )
    return "\n".join(lines)


def _clear(out: Path) -> None:
    """Remove an earlier run's outputs from `out`: they must not pass for this run's."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for events in (out / "logs").glob("events.out.tfevents.*"):  # TensorBoard's
        events.unlink()


def keep_freed_memory() -> None:
    """Keep freed memory in the process heap (glibc only; elsewhere a no-op).

    glibc hands every block above 32 MB back to the OS when it is freed, so each training step
    page-faults its large activations back in: a sixth of a CPU TIGER step at our shapes. The
    cost is that the heap does not shrink after its peak.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-4, 0)  # M_MMAP_MAX: serve no allocation by mmap
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never trim the heap top


def make_datamodule(cfg: DictConfig, split: Split) -> SequenceDataModule:
    """A run's training samples and evaluation users, batched as the config says."""
    t = cfg.trainer
    return SequenceDataModule(
        split,
        cfg.data.max_history,
        cfg.data.sliding_window,
        t.batch_size,
        t.eval_batch_size,
        t.bucket_by_length,
        cfg.seed,
        t.val_users,
        fixed_shapes=t.get("packed", True) is False,  # a run folder from before it: packed
    )


def peak_memory() -> dict[str, float]:
    """The process's peak resident memory so far (`run/peak_rss_mb`) and, on a GPU, the peak of
    the tensors torch allocated (`run/peak_gpu_mb`)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"run/peak_rss_mb": rss / (2**20 if sys.platform == "darwin" else 2**10)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["run/peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def run(cfg: DictConfig, out: str | Path) -> dict[str, float]:
    """Run the pipeline of a composed config; write config.yaml, metrics.json and stage outputs.

    Under DDP every process runs it (Lightning re-runs the command); only the main one writes.
    """
    out = Path(out)
    main = main_process()
    cfg.trainer.packed = resolve_packed(cfg.trainer)  # the resolved value keys the model
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _clear(out)
        (out / "config.yaml").write_text(to_yaml(cfg))
    start = time.perf_counter()
    keep_freed_memory()
    L.seed_everything(cfg.seed, verbose=False)
    torch.set_float32_matmul_precision(MATMUL_PRECISION)
    generator_cls = component(GENERATORS, cfg.generator, "generator")
    generator_cls.check_params(**params(cfg.generator))  # before the costly stages
    check_devices(cfg.trainer)
    logger = make_logger(cfg, out, generator_cls.consumes)
    cache = StageCache(os.environ.get("GRID_CACHE", cfg.cache_dir))
    stages = prepare(cfg, cache, generator_cls.consumes, min_items=max(KS))
    provenance = {}  # cache folder per stage
    if stages.embeddings_key is not None:
        provenance["embeddings"] = str(cache.path("embeddings", stages.embeddings_key))
    if stages.cf_embeddings_key is not None:
        provenance["cf_embeddings"] = str(cache.path("embeddings", stages.cf_embeddings_key))
    if stages.tokenizer_report is not None:
        provenance["sids"] = str(cache.path("sids", stages.sids_key))
        if main:
            report = json.dumps(stages.tokenizer_report, indent=2)
            (out / "tokenizer_report.json").write_text(report)
            shutil.copy(cache.path("sids", stages.sids_key) / "sids.npz", out / "sids.npz")
    t = cfg.trainer
    datamodule = make_datamodule(cfg, stages.split)
    inputs = stages.inputs()
    model = generator_cls.build(inputs, **params(cfg.generator), packed=t.packed)
    if model.trainable:
        key = model_key(cfg, stages)
        folder = cache.path("model", key)
        provenance["model"] = str(folder)
        # One process trains a key, the others wait and reuse it; a finished one needs no lock.
        # The other processes of a DDP run train with the main one, which holds the lock.
        free = cache.done("model", key) or not main
        with nullcontext() if free else cache.locked("model", key):
            best = _fit(cfg, model, datamodule, folder, logger)
        checkpoint = model.load_checkpoint(best)
        if main:
            shutil.copy(best, out / "model.ckpt")
            selection = _selection(cfg, model, len(datamodule.valid_set), checkpoint)
            (out / "selection.json").write_text(json.dumps(selection, indent=2))
    if main:
        (out / "stages.json").write_text(json.dumps(provenance, indent=2))
    categories = category_matrix(stages.dataset.items)
    metrics = _evaluate(cfg, model, datamodule, out, logger, categories)
    baseline = (
        metrics
        if isinstance(model, Popularity)
        else _evaluate(cfg, Popularity.build(inputs), datamodule, out, False, categories)
    )
    if not main:
        return metrics
    metrics["run/seconds"] = time.perf_counter() - start
    metrics.update(peak_memory())  # a run whose model came from the cache did not train it here
    if model.trainable and (folder / "training.json").is_file():  # from the run that trained it
        training = json.loads((folder / "training.json").read_text())
        metrics["train/seconds"] = training["seconds"]
        metrics["train/samples_per_s"] = training["samples_per_s"]
        if "epochs" in training:
            metrics["train/epochs"] = training["epochs"]
        metrics["train/devices"] = training.get("devices", 1)
    metrics.update(
        {
            f"baseline/popularity/{k}": v
            for k, v in baseline.items()
            if not k.startswith(("infer/", "run/"))
        }
    )
    if model.trainer.world_size == 1:  # a DDP rank holds its own users only: no gather yet
        _write_per_user(out, model.test_per_user, stages.dataset.users)
    else:
        log.warning("per_user.npz is not written under DDP; grid report's paired test skips it")
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, out / "metrics.json")
    log_final(logger, metrics, stages.tokenizer_report)
    print(results_table(metrics, baseline))
    return metrics


def measure_inference(folders: list[Path], rounds: int = 1) -> list[dict[str, float]]:
    """Test inference of finished runs, timed back to back in this one process: each run's model
    is rebuilt from its config.yaml and model.ckpt (stages from the cache), validated as the run
    did where validation sets what inference uses (SETRec's beta), then tested `rounds` times,
    runs interleaved. Per run: the test metrics of its last round, with the median
    `infer/users_per_s` and `infer/seconds` over the rounds."""
    keep_freed_memory()
    torch.set_float32_matmul_precision("high")
    loaded = []
    for folder in folders:
        cfg = OmegaConf.load(folder / "config.yaml")
        cfg.trainer.progress_bar = False
        L.seed_everything(cfg.seed, verbose=False)
        generator_cls = component(GENERATORS, cfg.generator, "generator")
        cache = StageCache(os.environ.get("GRID_CACHE", cfg.cache_dir))
        stages = prepare(cfg, cache, generator_cls.consumes, min_items=max(KS))
        packed = cfg.trainer.get("packed", True)  # runs from before the fixed-shape path packed
        model = generator_cls.build(stages.inputs(), **params(cfg.generator), packed=packed)
        if model.trainable:
            model.load_checkpoint(folder / "model.ckpt")
        datamodule = make_datamodule(cfg, stages.split)
        if model.chooses_on_validation():  # untimed, as the run validated before its test
            trainer = _trainer(cfg, folder)
            with _interruptible(trainer):
                trainer.validate(model, datamodule.full_val_dataloader(), verbose=False)
        loaded.append((cfg, folder, model, datamodule))
    results: list[list[dict[str, float]]] = [[] for _ in folders]
    for _ in range(rounds):
        for (cfg, folder, model, datamodule), tested in zip(loaded, results, strict=True):
            trainer = _trainer(cfg, folder)
            with _interruptible(trainer):
                test = trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
            tested.append({k: float(v) for k, v in test[0].items()})
    for tested in results:
        for name in ("infer/users_per_s", "infer/seconds"):
            tested[-1][name] = float(np.median([t[name] for t in tested]))
    return [tested[-1] for tested in results]
