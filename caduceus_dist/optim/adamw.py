"""AdamW over the model's reference weight-decay groups (docs/reference-recipe.md §5), and the LR setter
the training step calls with the schedule's value."""

from __future__ import annotations

import torch

from caduceus_dist.model.optim_groups import param_groups
from caduceus_dist.optim.config import OptimizerConfig


def group_names(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The model's reference parameter groups, with parameter names instead of tensors.

    Names survive wrapping (FSDP2 replaces every Parameter by a DTensor and drops the attributes
    that mark A_log / D as no-decay), so engines take them from the bare model before wrapping.
    """
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
