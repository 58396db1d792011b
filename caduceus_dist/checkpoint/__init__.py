"""Atomic, verified checkpoints; auto-resume; preemption (exit 75). docs/resume.md describes the semantics.

    config.py      CheckpointConfig (the `checkpoint:` keys; no torch)
    manifest.py    the on-disk layout and the manifest that vouches for a checkpoint
    manager.py     CheckpointManager: when to save, atomic saves
    retention.py   which checkpoints to keep; deleting the others in the background
    staging.py     asynchronous saves: node-local staging and the background copy
    restore.py     which checkpoint a run resumes from, verification, compatibility, RNG streams
    preemption.py  the signal flag the manager acts on at a step boundary
    rng.py         every generator a rank owns, captured and restored exactly
"""

from caduceus_dist.lazy import lazy_exports

_EXPORTS = {
    "CheckpointConfig": "config",
    "CheckpointManager": "manager",
    "CheckpointWriteError": "manager",
    "CheckpointSavesKeepFailing": "manager",
    "CheckpointError": "restore",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
