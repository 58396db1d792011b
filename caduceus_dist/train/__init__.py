"""The training loop all engines share, and its `train:` config.

    config.py   TrainConfig (no torch)
    trainer.py  Trainer: builds the components from a JobConfig and runs the steps
"""

from caduceus_dist.lazy import lazy_exports

_EXPORTS = {"TrainConfig": "config", "Trainer": "trainer"}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
