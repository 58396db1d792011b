"""The optimizer (AdamW over the reference parameter groups) and the LR schedule, a pure function of the step.

    config.py    OptimizerConfig, ScheduleConfig (the `optim:` and `schedule:` keys; no torch)
    schedule.py  SCHEDULES and lr_at (no torch: a resumed run recomputes the LR from its step)
    adamw.py     build_optimizer, group_names, set_lr
"""

from caduceus_dist.lazy import lazy_exports

_EXPORTS = {
    "OptimizerConfig": "config",
    "ScheduleConfig": "config",
    "SCHEDULES": "schedule",
    "lr_at": "schedule",
    "build_optimizer": "adamw",
    "group_names": "adamw",
    "set_lr": "adamw",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
