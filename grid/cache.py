"""Content-addressed stage cache: each stage's output lives under a key of its inputs and config."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

DONE = "DONE"


def stage_key(*parts) -> str:
    """A short hash of configs (dicts or OmegaConf nodes), upstream keys and versions."""
    plain = [
        OmegaConf.to_container(p, resolve=True) if isinstance(p, DictConfig | ListConfig) else p
        for p in parts
    ]
    blob = json.dumps(plain, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_root() -> Path:
    return Path(os.environ.get("GRID_CACHE", ".cache/grid"))


class StageCache:
    """Folders `root/stage/key/` written atomically: a folder counts only once it holds DONE."""

    def __init__(self, root: str | Path | None = None, enabled: bool = True):
        self.root, self.enabled = Path(root) if root else default_root(), enabled

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """The folder of a finished stage, building it with `build(tmp_dir)` first if needed.

        Returns (folder, hit). A build that raises leaves nothing behind under the key.
        """
        final = self.path(stage, key)
        if self.enabled and (final / DONE).is_file():
            return final, True
        tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            (tmp / DONE).write_text(key)
            if (final / DONE).is_file():  # a concurrent run finished the same stage first
                return final, False
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final, False
