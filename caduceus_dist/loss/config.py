"""The `loss:` section of a job recipe (no torch: configs load before any model is built)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LossConfig:
    """The `loss:` section. `softmask_weight` weighs target positions whose base was lower case (soft-masked
    repeat) in the training loss; 1.0 is the reference, PlantCAD and Evo 2 use 0.1 (docs/training.md,
    "Soft-masked repeats")."""

    softmask_weight: float = 1.0

    def validate(self) -> None:
        if not 0.0 <= self.softmask_weight <= 1.0:
            raise ValueError(f"loss.softmask_weight must be in [0, 1], got {self.softmask_weight}")
