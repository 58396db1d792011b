"""Asynchronous saves: node-local staging and the background copy into the checkpoint directory.

Each rank writes its part to `staging` (node-local memory by default), then one thread per node copies,
hashes and fsyncs it into `step_N.tmp/` while training continues; the manager seals the checkpoint once
every node reports its copy done (docs/resume.md §6).
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from caduceus_dist.checkpoint.manifest import relative_files, step_dir_name
from caduceus_dist.fsio import copy_hashed

# all-reduce(MAX) codes of a background copy: wait while any node is still copying
DONE, FAILED, COPYING = 0, 1, 2


def staging_dir(staging_root: str, run_dir: Path, step: int) -> Path:
    """Where a run stages `step` on this node; keyed by the run directory so runs never share one."""
    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return Path(staging_root) / f"caduceus_dist-{run_id}" / step_dir_name(step)


@dataclass
class PendingSave:
    """An asynchronous save between its blocking part and its finalisation."""

    step: int
    tmp: Path
    staging: Path
    started: float
    blocking_s: float
    thread: threading.Thread | None = None  # only on the rank that copies for its node
    files: dict[str, dict] | None = None
    error: str | None = None

    def start_copy(self, rank: int) -> None:
        self.thread = threading.Thread(target=self._copy, args=(rank,), name="checkpoint-copy", daemon=True)
        self.thread.start()

    def state(self) -> int:
        """This node's copy: COPYING, FAILED or DONE (ranks that do not copy are DONE)."""
        if self.thread is not None and self.thread.is_alive():
            return COPYING
        return FAILED if self.error else DONE

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()

    def _copy(self, rank: int) -> None:
        """Background thread: staging -> step_N.tmp, hashing while copying, fsync, then free the staging memory."""
        try:
            files = {}
            for name in relative_files(self.staging):
                target = self.tmp / name
                target.parent.mkdir(parents=True, exist_ok=True)
                files[name] = copy_hashed(self.staging / name, target).as_dict()
            self.files = files
        except OSError as exc:
            self.error = f"rank {rank} on {socket.gethostname()} copying to {self.tmp}: {type(exc).__name__}: {exc}"
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
