"""Durability helpers shared by the sharder and the checkpoint manager."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory so that renames and new entries in it survive a crash (POSIX)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
