"""CheckpointConfig: when checkpoints are written, which are kept, how a run resumes and what stops it."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from caduceus_dist.fsio import VERIFY_MODES

RESUME_MODES = ("auto", "never")  # anything else is a path to one checkpoint directory
WRITE_ERROR_POLICIES = ("retry", "stop")


@dataclass
class CheckpointConfig:
    """The `checkpoint.*` keys of a job.

    - every: save when `step % every == 0` (0: only at the end and on preemption).
    - keep: keep the newest `keep` checkpoints (0: keep all) ...
    - keep_every: ... plus, forever, every checkpoint whose step is a multiple of `keep_every` (0: none).
    - resume: `auto` (newest valid checkpoint of the run, else a fresh start), `never` (fresh start;
      refuses a run directory that already holds checkpoints), or the path of one checkpoint directory.
    - async_save: write the checkpoint while training goes on; the step only blocks while the engine
      writes to `async_staging_dir` (node-local memory by default), the copy to the run directory,
      its checksums and the manifest happen in the background.
    - on_write_error: `retry` (log it, keep training, try again at the next interval) or `stop`
      (stop the run with the error). Either way the previous checkpoint and `latest` stay untouched.
    - max_failed_saves: with `retry`, after this many failed saves in a row the run stops with exit 75
      (requeue me) instead of training on for hours without a checkpoint (0: never).
    - preemption_signals: signals that mean "save and exit 75 (requeue me)". SIGUSR1 is left out on
      purpose: NCCL may claim it.
    - verify: what `resume` checks before trusting a checkpoint: `sha256` (every byte) or `size`
      (file list and sizes; for multi-terabyte checkpoints where hashing costs minutes).
    """

    every: int = 1000
    keep: int = 3
    keep_every: int = 0
    resume: str = "auto"
    async_save: bool = False
    async_staging_dir: str = "/dev/shm"
    on_write_error: str = "retry"
    max_failed_saves: int = 3
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR2"])
    verify: str = "sha256"

    def validate(self) -> None:
        """Fail at start-up, naming the key, rather than at the first save hours later."""
        for key in ("every", "keep", "keep_every", "max_failed_saves"):
            if getattr(self, key) < 0:
                raise ValueError(f"checkpoint.{key} must be >= 0, got {getattr(self, key)}")
        if self.on_write_error not in WRITE_ERROR_POLICIES:
            raise ValueError(
                f"checkpoint.on_write_error must be one of {WRITE_ERROR_POLICIES}, got {self.on_write_error!r}"
            )
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"checkpoint.verify must be one of {VERIFY_MODES}, got {self.verify!r}")
        if not self.resume:
            raise ValueError("checkpoint.resume must be 'auto', 'never' or a checkpoint directory, got ''")
        for name in self.preemption_signals:
            if not isinstance(getattr(signal, str(name), None), signal.Signals):
                raise ValueError(
                    f"checkpoint.preemption_signals: {name!r} is not a signal name of this system "
                    "(use names such as SIGTERM, SIGUSR2)"
                )
            if name in ("SIGKILL", "SIGSTOP"):
                raise ValueError(f"checkpoint.preemption_signals: {name} cannot be caught")
