"""Reference weight-decay groups (docs/reference-recipe.md §5), kept with the model so no optimizer can get them wrong."""

from __future__ import annotations

from typing import Any

from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters exempt from decay: biases, `_no_weight_decay` (A_log, D), embeddings."""
    exempt: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(prefix=module_name, recurse=False):
            if (
                param_name.endswith("bias")
                or getattr(param, "_no_weight_decay", False)
                or isinstance(module, nn.Embedding)
            ):
                exempt.add(param_name)
    return exempt


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """[{params decayed, weight_decay}, {params not decayed, 0.0}]; a tied Parameter appears once.

    The tied LM head shares the embedding Parameter, which named_parameters lists once under the
    embedding's name, so it is never decayed; RMSNorm weights are decayed, as in the reference.
    """
    exempt = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():  # deduplicates tied Parameters
        if param.requires_grad:
            (no_decay if name in exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
