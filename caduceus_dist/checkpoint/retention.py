"""Retention: which checkpoints a run keeps, and deleting the others without making the ranks wait.

Rank 0 applies it after each save while the other ranks wait at the next collective, so the slow part,
deleting the bytes, runs in a background thread; the rename to `.trash` that stops a directory from
being a checkpoint is instant and happens at once (a deletion that a crash interrupts is finished at the
next start). docs/resume.md §1.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

from caduceus_dist.checkpoint.manifest import list_checkpoints, move_to_trash, read_latest, step_of

log = logging.getLogger("caduceus_dist.checkpoint")


class Retention:
    """Keep the newest `keep` checkpoints (0: all) plus every multiple of `keep_every` (0: none)."""

    def __init__(self, root: Path, keep: int, keep_every: int):
        self.root, self.keep, self.keep_every = root, keep, keep_every
        self._deleter: threading.Thread | None = None

    def apply(self) -> None:
        """Retire the checkpoints retention drops; checkpoints later than `latest` are left alone."""
        latest = read_latest(self.root)
        limit = step_of(Path(latest)) if latest else None
        ours = [(step, path) for step, path in list_checkpoints(self.root) if limit is None or step <= limit]
        kept = {step for step, _ in ours[-self.keep :]} if self.keep else {step for step, _ in ours}
        if self.keep_every:
            kept |= {step for step, _ in ours if step % self.keep_every == 0}
        trashed = []
        for step, path in ours:
            if step not in kept and step != limit:
                try:
                    trashed.append(move_to_trash(path))
                except OSError as exc:
                    log.warning("retention could not delete %s: %s", path, exc)
        if trashed:
            self.join()
            self._deleter = threading.Thread(target=_delete_all, args=(trashed,), name="checkpoint-retention",
                                             daemon=True)
            self._deleter.start()

    def join(self) -> None:
        """Wait for the deletion in flight (at close, and before the next one starts)."""
        if self._deleter is not None:
            self._deleter.join()
            self._deleter = None


def _delete_all(paths: list[Path | None]) -> None:
    for path in paths:
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)
