"""The `optim:` and `schedule:` keys of a job (docs/reference-recipe.md §5 gives the reference values)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OptimizerConfig:
    """AdamW settings (reference: lr 8e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1)."""

    lr: float = 8e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it


@dataclass
class ScheduleConfig:
    """LR schedule (reference: linear warm-up from `warmup_init_lr`, then cosine down to `min_lr`).

    `total_steps` defaults to `train.max_steps`; set it to keep the schedule of a longer run when
    training only part of it (e.g. a smoke test of a 50k-step recipe).
    """

    name: str = "cosine"
    warmup_fraction: float = 0.1
    warmup_init_lr: float = 1e-6
    min_lr: float = 1e-4
    total_steps: int | None = None
