"""Experiment tracking: the Lightning logger a run writes to (CSV, TensorBoard, wandb or none)."""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from grid.errors import GridError

log = logging.getLogger(__name__)

LOGGERS = ("csv", "tensorboard", "wandb", "none")
WANDB_MODES = ("auto", "online", "offline")
REACH_SECONDS = 3.0  # how long online mode waits for the wandb server before logging offline


def flat_config(cfg: DictConfig) -> dict:
    """The resolved config as one level of dotted keys (`generator.hidden: 16`)."""
    flat = {}

    def visit(prefix: str, node) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                visit(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node

    visit("", OmegaConf.to_container(cfg, resolve=True))
    return flat


def _wandb_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _reachable(url: str, seconds: float = REACH_SECONDS) -> bool:
    """Whether a TCP connection to `url`'s server opens within `seconds` (name lookup included,
    which has no timeout of its own: it runs in a thread left behind if it hangs)."""
    parsed = urlparse(url)
    address = (parsed.hostname, parsed.port or (80 if parsed.scheme == "http" else 443))
    opened = []

    def connect() -> None:
        try:
            socket.create_connection(address, timeout=seconds).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(opened)


def _has_wandb_key() -> bool:
    """An API key in WANDB_API_KEY or a `wandb login` entry in ~/.netrc (no network)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(_wandb_url()).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(cfg: DictConfig) -> str:
    """online, offline or disabled: `trainer.wandb_mode`, else WANDB_MODE, else online only when
    an API key is there; online without a key, or with a server that does not answer within
    REACH_SECONDS, falls back to offline with a warning (wandb itself would wait ~100 s, then
    fail the run)."""
    mode = cfg.trainer.get("wandb_mode", "auto") or "auto"
    if mode not in WANDB_MODES:
        choices = ", ".join(WANDB_MODES)
        raise GridError(f"unknown trainer.wandb_mode {mode!r}; choose one of {choices}")
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").lower()
        mode = env if env in ("online", "offline", "disabled") else None
        mode = mode or ("online" if _has_wandb_key() else "offline")
    if mode == "online" and not _has_wandb_key():
        if rank_zero_only.rank == 0:  # once, not in every DDP process
            log.warning(
                "wandb online mode needs an API key (WANDB_API_KEY or `wandb login`): logging "
                "offline instead; upload later with `wandb sync OUT/wandb/offline-run-*`"
            )
        mode = "offline"
    if mode == "online" and not _reachable(_wandb_url()):
        if rank_zero_only.rank == 0:
            log.warning(
                "cannot reach the wandb server %s within %.0f s: logging offline instead; upload "
                "later with `wandb sync OUT/wandb/offline-run-*`",
                _wandb_url(),
                REACH_SECONDS,
            )
        mode = "offline"
    return mode


def tags(cfg: DictConfig, consumes: frozenset[str]) -> list[str]:
    """Dataset, tokenizer (when the generator reads SIDs) and generator names."""
    names = [cfg.data.name, cfg.tokenizer.name if "sids" in consumes else None, cfg.generator.name]
    return [str(n) for n in names if n]


def _require(package: str, logger: str, install: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise GridError(
            f"trainer.logger={logger} needs the {package} package: {install} "
            f"(or set trainer.logger=csv)"
        )


def make_logger(cfg: DictConfig, out: Path, consumes: frozenset[str] = frozenset()):
    """The Lightning logger `trainer.logger` names, writing under `out`; False for none."""
    kind = cfg.trainer.logger
    if kind in (None, "none"):
        return False
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(out, name="logs", version="")
    if kind == "tensorboard":
        if importlib.util.find_spec("tensorboardX") is None:
            _require("tensorboard", kind, "pip install tensorboard")
        return L.pytorch.loggers.TensorBoardLogger(out, name="logs", version="")
    if kind == "wandb":
        _require("wandb", kind, "pip install wandb")
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(
            project=cfg.trainer.wandb_project,
            save_dir=str(out),
            mode=wandb_mode(cfg),
            group=cfg.trainer.get("wandb_group") or os.environ.get("GRID_SWEEP") or None,
            tags=tags(cfg, consumes),
            config=flat_config(cfg),
        )
    raise GridError(f"unknown trainer.logger {kind!r}; choose one of {', '.join(LOGGERS)}")


def log_final(logger, metrics: dict[str, float], tokenizer_report: dict | None) -> None:
    """Log a finished run's metrics and tokenizer quality, then close the logger (for wandb,
    this finishes the run: its summary holds every final metric)."""
    if not logger:
        return
    final = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    for name, value in (tokenizer_report or {}).items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            final[f"tokenizer/{name}"] = value
    logger.log_metrics(final)
    if isinstance(logger, L.pytorch.loggers.WandbLogger):
        import wandb

        logger.experiment.summary.update(final)
        logger.experiment.finish()
        wandb.teardown()  # the run's files are complete once `grid run` returns, not at exit
    else:
        logger.finalize("success")
