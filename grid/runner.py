"""`grid run`: the cached stages, then a Lightning fit, model selection and a full-ranking test."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from grid.cache import StageCache, stage_key
from grid.config import to_yaml
from grid.data import SequenceDataModule
from grid.errors import GridError
from grid.generators import GENERATORS, PipelineInputs, Popularity, Recommender
from grid.pipeline import Stages, component, embed_collaborative, params, prepare

log = logging.getLogger(__name__)

# Generator fields that change only inference, so a sweep over them reuses one trained model.
INFERENCE_FIELDS = ("decoding", "beam_width")
TRAINER_EVAL_FIELDS = ("eval_batch_size", "logger", "wandb_project", "progress_bar")
MODEL_STAGE_VERSION = 1


def _logger(cfg: DictConfig, out: Path):
    kind = cfg.trainer.logger
    if kind in (None, "none"):
        return False
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(out, name="logs", version="")
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        offline = not os.environ.get("WANDB_API_KEY")
        return WandbLogger(
            project=cfg.trainer.wandb_project,
            save_dir=str(out),
            offline=offline,
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    raise GridError(f"unknown trainer.logger {kind!r}; choose csv, wandb or none")


def model_key(cfg: DictConfig, stages: Stages) -> str:
    """Cache key of a trained model: upstream SIDs, data, generator and training settings."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data).items() if k != "path"}
    generator = {k: v for k, v in params(cfg.generator).items() if k not in INFERENCE_FIELDS}
    trainer = {
        k: v for k, v in OmegaConf.to_container(cfg.trainer).items() if k not in TRAINER_EVAL_FIELDS
    }
    upstream = stages.sids_key or stages.embeddings_key
    if stages.cf_embeddings_key is not None:
        upstream = [upstream, stages.cf_embeddings_key]
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
        strategy=t.strategy,
        precision=t.precision,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        max_time=t.max_time,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        callbacks=list(callbacks),
        logger=logger,
        default_root_dir=out,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def _fit(cfg: DictConfig, model: Recommender, datamodule, folder: Path, logger) -> Path:
    """Train into `folder` (resuming from last.ckpt if a previous run was interrupted)."""
    best = folder / "best.ckpt"
    if (folder / "DONE").is_file() and best.is_file():
        log.info("trained model %s found in the cache: skipping training", folder.name)
        return best
    folder.mkdir(parents=True, exist_ok=True)
    monitor = cfg.trainer.monitor
    callbacks = [
        ModelCheckpoint(
            dirpath=folder,
            filename="best",
            monitor=monitor,
            mode="max",
            save_top_k=1,
            save_last=True,
            enable_version_counter=False,
        ),
        EarlyStopping(monitor=monitor, mode="max", patience=cfg.trainer.patience),
    ]
    trainer = _trainer(cfg, folder, callbacks, logger)
    last = folder / "last.ckpt"
    trainer.fit(model, datamodule=datamodule, ckpt_path=last if last.is_file() else None)
    if trainer.interrupted:
        raise GridError(f"training interrupted; run the same command again to resume from {last}")
    if not best.is_file():  # no validation ran (e.g. a tiny step budget): keep the final weights
        trainer.save_checkpoint(best)
    (folder / "DONE").write_text("")
    return best


def _evaluate(
    cfg: DictConfig, model: Recommender, datamodule: SequenceDataModule, out: Path, logger
) -> dict[str, float]:
    trainer = _trainer(cfg, out, logger=logger)
    valid = trainer.validate(model, dataloaders=datamodule.full_val_dataloader(), verbose=False)
    test = trainer.test(model, dataloaders=datamodule.test_dataloader(), verbose=False)
    return {k: float(v) for k, v in {**valid[0], **test[0]}.items()}


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
    if "infer/seconds" in metrics:
        lines.append(
            f"inference: {metrics['infer/seconds']:.1f} s over the test set, "
            f"{metrics['infer/users_per_s']:.0f} users/s"
        )
    return "\n".join(lines)


def run(cfg: DictConfig, out: str | Path) -> dict[str, float]:
    """Run the pipeline of a composed config; write config.yaml, metrics.json and stage outputs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)  # never leave a stale result beside new output
    (out / "config.yaml").write_text(to_yaml(cfg))
    start = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)
    torch.set_float32_matmul_precision("high")
    generator_cls = component(GENERATORS, cfg.generator, "generator")
    cache = StageCache(os.environ.get("GRID_CACHE", cfg.cache_dir))
    stages = prepare(cfg, cache, tokenize_items=generator_cls.needs_sids)
    provenance = {"embeddings": str(cache.path("embeddings", stages.embeddings_key))}
    if generator_cls.needs_cf:
        stages.cf_embeddings, stages.cf_embeddings_key = embed_collaborative(
            stages.dataset, stages.split, cfg.generator.get("cf_encoder"), cache
        )
        provenance["cf_embeddings"] = str(cache.path("embeddings", stages.cf_embeddings_key))
    if stages.tokenizer_report is not None:
        (out / "tokenizer_report.json").write_text(json.dumps(stages.tokenizer_report, indent=2))
        shutil.copy(cache.path("sids", stages.sids_key) / "sids.npz", out / "sids.npz")
        provenance["sids"] = str(cache.path("sids", stages.sids_key))
    t = cfg.trainer
    datamodule = SequenceDataModule(
        stages.split,
        cfg.data.max_history,
        cfg.data.sliding_window,
        t.batch_size,
        t.eval_batch_size,
        t.bucket_by_length,
        cfg.seed,
        t.val_users,
    )
    inputs = PipelineInputs(
        stages.dataset.num_items,
        stages.dataset.num_users,
        stages.split.train,
        stages.sids,
        stages.embeddings,
        cf_embeddings=stages.cf_embeddings,
    )
    model = generator_cls.build(inputs, **params(cfg.generator))
    logger = _logger(cfg, out)
    if model.trainable:
        folder = cache.path("model", model_key(cfg, stages))
        provenance["model"] = str(folder)
        best = _fit(cfg, model, datamodule, folder, logger)
        model.load_state_dict(
            torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        )
        shutil.copy(best, out / "model.ckpt")
    (out / "stages.json").write_text(json.dumps(provenance, indent=2))  # cache folder per stage
    metrics = _evaluate(cfg, model, datamodule, out, logger)
    baseline = (
        metrics
        if isinstance(model, Popularity)
        else _evaluate(cfg, Popularity.build(inputs), datamodule, out, False)
    )
    metrics["run/seconds"] = time.perf_counter() - start
    metrics.update(
        {f"baseline/popularity/{k}": v for k, v in baseline.items() if not k.startswith("infer/")}
    )
    if logger and stages.tokenizer_report is not None:
        logger.log_metrics(
            {
                f"tokenizer/{k}": v
                for k, v in stages.tokenizer_report.items()
                if isinstance(v, int | float)
            }
        )
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    os.replace(tmp, out / "metrics.json")
    print(results_table(metrics, baseline))
    return metrics
