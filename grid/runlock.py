"""The lock a `grid run` holds on its output folder for the run's life.

`grid run` takes it itself (not its launcher), so it outlives a killed sweep: a second writer of
the folder fails at once instead of interleaving its files with the first one's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from grid.errors import GridError

LOCK, PID = "run.lock", "run.pid"


def busy(folder: Path) -> bool:
    """Whether a `grid run` is writing `folder` now."""
    try:
        FileLock(folder / LOCK, timeout=0).acquire().lock.release()
    except Timeout:
        return True
    return False


def busy_message(folder: Path) -> str:
    """The one line saying which process writes `folder`."""
    try:
        pid = f" (pid {int((folder / PID).read_text())})"
    except (OSError, ValueError):
        pid = ""
    return (
        f"another process{pid} is writing {folder}; wait for it to finish (or stop it), "
        f"or give another --out"
    )


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold `folder`'s run lock; raise GridError naming the holder if another process has it."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK)
    try:
        lock.acquire(timeout=2)  # `busy` probes of a sweep hold it for an instant
    except Timeout:
        raise GridError(busy_message(folder))
    try:
        (folder / PID).write_text(f"{os.getpid()}\n")
        yield
    finally:
        (folder / PID).unlink(missing_ok=True)
        lock.release()
