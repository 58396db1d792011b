"""Atomic, verified checkpoints; auto-resume; preemption (exit 75); export support. See manager.py."""

from caduceus_dist.checkpoint.config import CheckpointConfig
from caduceus_dist.checkpoint.manager import CheckpointError, CheckpointManager, CheckpointWriteError
from caduceus_dist.checkpoint.preemption import EXIT_PREEMPTED

__all__ = ["EXIT_PREEMPTED", "CheckpointConfig", "CheckpointError", "CheckpointManager", "CheckpointWriteError"]
