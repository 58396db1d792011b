"""Learning-rate schedules as pure functions of the optimizer step.

A resumed run recomputes the learning rate from the step it restarts at: there is no scheduler state to
checkpoint or to get out of sync. The reference schedule is docs/reference-recipe.md §5.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from caduceus_dist.optim.config import OptimizerConfig, ScheduleConfig


def _warmup(step: int, peak: float, cfg: ScheduleConfig, total: int) -> float | None:
    """The linear warm-up from `warmup_init_lr` to `peak` over the first warmup_fraction of `total`;
    None once it is over."""
    warmup = int(cfg.warmup_fraction * total)
    if step < warmup:
        return cfg.warmup_init_lr + step * (peak - cfg.warmup_init_lr) / warmup
    return None


def _cosine(step: int, peak: float, cfg: ScheduleConfig, total: int) -> float:
    """timm CosineLRScheduler as the reference configures it (warmup_prefix, one cycle, then min_lr)."""
    warming = _warmup(step, peak, cfg, total)
    if warming is not None:
        return warming
    warmup = int(cfg.warmup_fraction * total)
    span = total - warmup
    if span <= 0 or step >= total:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * (step - warmup) / span))


def _constant(step: int, peak: float, cfg: ScheduleConfig, total: int) -> float:
    """Linear warm-up, then the peak LR forever (ablations, equivalence tests)."""
    warming = _warmup(step, peak, cfg, total)
    return peak if warming is None else warming


SCHEDULES: dict[str, Callable[[int, float, ScheduleConfig, int], float]] = {
    "cosine": _cosine,
    "constant": _constant,
}


def lr_at(step: int, optim: OptimizerConfig, schedule: ScheduleConfig, max_steps: int) -> float:
    """Learning rate of the update made at 0-based optimizer step `step`."""
    total = schedule.total_steps or max_steps
    return SCHEDULES[schedule.name](step, optim.lr, schedule, total)
