"""Content-addressed stage cache: each stage's output lives under a key of its inputs and config."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig, ListConfig, OmegaConf

log = logging.getLogger(__name__)

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
    """Folders `root/stage/key/`, published whole: a folder counts only once it holds DONE.

    One process at a time builds a key (a file lock `root/stage/key.lock`); the others wait and
    reuse its result. Builds happen in `.tmp-KEY-*` folders renamed onto the key when complete.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root else default_root()

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def done(self, stage: str, key: str) -> bool:
        return (self.path(stage, key) / DONE).is_file()

    def _lock(self, stage: str, key: str) -> FileLock:
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        return FileLock(self.root / stage / f"{key}.lock")

    @contextmanager
    def locked(self, stage: str, key: str) -> Iterator[None]:
        """Hold the key's lock, saying so when another process holds it first."""
        lock = self._lock(stage, key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.warning("waiting for another process to finish %s %s", stage, key)
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def get(self, stage: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """The folder of a finished stage, building it with `build(tmp_dir)` first if needed.

        Returns (folder, hit). A build that raises leaves nothing behind under the key.
        """
        final = self.path(stage, key)
        if self.done(stage, key):
            return final, True
        with self.locked(stage, key):
            if self.done(stage, key):  # another process built it while we waited
                return final, True
            self._remove_stale(stage, key)
            tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                build(tmp)
                (tmp / DONE).write_text(key)
                self._publish(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final, False

    def _publish(self, tmp: Path, final: Path) -> None:
        """Rename the complete `tmp` onto `final`; if another process published first, keep its."""
        if final.exists() and not (final / DONE).is_file():  # unfinished, so nobody reads it
            stale = tmp.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not (final / DONE).is_file():
                raise

    def _remove_stale(self, stage: str, key: str) -> None:
        """Remove temp folders of builds that died (a SIGKILL): those whose key nobody locks.

        Called holding `key`'s lock, so its own temp folders are stale too.
        """
        for tmp in (self.root / stage).glob(".tmp-*"):
            owner = tmp.name.split("-")[1]
            if owner == key:
                shutil.rmtree(tmp, ignore_errors=True)
                continue
            try:
                with self._lock(stage, owner).acquire(timeout=0):
                    shutil.rmtree(tmp, ignore_errors=True)
            except Timeout:  # that key is being built right now
                pass
