"""The one exception users see: a single line naming the problem and the fix."""

import os
from pathlib import Path


class GridError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits non-zero."""


def check_writable(folder: Path, what: str, option: str) -> None:
    """Raise GridError unless `folder` can be created and written to; `option` names the
    setting that chooses it."""
    if folder.exists() and not folder.is_dir():
        raise GridError(f"{what} {folder} is an existing file; point {option} at a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".grid-write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise GridError(
            f"cannot write to {what} {folder} ({e.strerror}); make it writable or point "
            f"{option} at another folder"
        )
