"""AdamW with the reference weight-decay groups and the reference LR schedule.

The schedule is a pure function of the optimizer step, so a resumed run recomputes the learning
rate from the step it restarts at: there is no scheduler state to checkpoint or to get out of sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class OptimizerConfig:
    """AdamW settings (spec 4.1: lr 8e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1)."""

    lr: float = 8e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it


@dataclass
class ScheduleConfig:
    """LR schedule (spec 4.1): linear warm-up from `warmup_init_lr`, then cosine down to `min_lr`.

    `total_steps` defaults to `train.max_steps`; set it to keep the schedule of a longer run when
    training only part of it (e.g. a smoke test of a 50k-step recipe).
    """

    name: str = "cosine"
    warmup_fraction: float = 0.1
    warmup_init_lr: float = 1e-6
    min_lr: float = 1e-4
    total_steps: int | None = None


def _cosine(step: int, peak: float, cfg: ScheduleConfig, total: int) -> float:
    """timm CosineLRScheduler as the reference configures it (warmup_prefix, one cycle, then min_lr)."""
    warmup = int(cfg.warmup_fraction * total)
    if step < warmup:
        return cfg.warmup_init_lr + step * (peak - cfg.warmup_init_lr) / warmup
    span = total - warmup
    if span <= 0 or step >= total:
        return cfg.min_lr
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1.0 + math.cos(math.pi * (step - warmup) / span))


def _constant(step: int, peak: float, cfg: ScheduleConfig, total: int) -> float:
    """Linear warm-up, then the peak LR forever (ablations, equivalence tests)."""
    warmup = int(cfg.warmup_fraction * total)
    if step < warmup:
        return cfg.warmup_init_lr + step * (peak - cfg.warmup_init_lr) / warmup
    return peak


SCHEDULES: dict[str, Callable[[int, float, ScheduleConfig, int], float]] = {
    "cosine": _cosine,
    "constant": _constant,
}


def lr_at(step: int, optim: OptimizerConfig, schedule: ScheduleConfig, max_steps: int) -> float:
    """Learning rate of the update made at 0-based optimizer step `step`."""
    total = schedule.total_steps or max_steps
    return SCHEDULES[schedule.name](step, optim.lr, schedule, total)


def group_names(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The model's reference parameter groups, with parameter names instead of tensors.

    Names survive wrapping (FSDP2 replaces every Parameter by a DTensor and drops the attributes
    that mark A_log / D as no-decay), so engines take them from the bare model before wrapping.
    """
    from caduceus_dist.model import param_groups

    name_of = {id(p): n for n, p in model.named_parameters()}
    return [{**group, "params": [name_of[id(p)] for p in group["params"]]}
            for group in param_groups(model, weight_decay)]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, names: list[dict] | None = None) -> torch.optim.AdamW:
    """AdamW over the reference groups (no decay on biases, A_log, D, embedding) of `model`'s parameters."""
    names = names if names is not None else group_names(model, cfg.weight_decay)
    params = dict(model.named_parameters())
    groups = [{**group, "params": [params[n] for n in group["params"]]} for group in names]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
