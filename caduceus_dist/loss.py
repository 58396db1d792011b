"""The masked-language-model loss: which positions are scored, how they are counted, how they are summed.

The training step calls this component and nothing else to turn logits into a loss, so a new objective
or a per-position weighting (e.g. down-weighting soft-masked repeats) changes this module only, never
an engine. The reference loss (docs/reference-model.md §9): cross-entropy in fp32 over the positions
whose target is not [PAD] (id 4), natural log, no masking of the padded-vocabulary logits.

Sums, not means, leave this module: the step divides by the target count of the *global* batch, so
the update is the gradient of the global mean whatever the split into ranks and micro-batches
(docs/resume.md §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from caduceus_dist.model.tokenizer import PAD_ID

IGNORE_INDEX = PAD_ID  # targets equal to [PAD] are not scored


def count_targets(targets: Tensor) -> Tensor:
    """Number of scored positions (a 0-d integer tensor on the targets' device)."""
    return (targets != IGNORE_INDEX).sum()


def mlm_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> tuple[Tensor, Tensor]:
    """Cross-entropy over positions whose target is not [PAD], in fp32; returns (loss, n_targets).

    reduction="mean" divides by max(n_targets, 1), so an all-[PAD] batch gives 0.0, never NaN (reference
    issue #77); reduction="sum" lets a trainer form the exact mean over a batch split across ranks.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat_targets = targets.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat_targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = count_targets(flat_targets)
    if reduction == "sum":
        return total, count
    return total / count.clamp(min=1), count


@dataclass
class LossSums:
    """One micro-batch's contribution, on the device: the summed loss (differentiable), its target count
    and hits (integer 0-d tensors; nothing here reads a value on the host)."""

    loss_sum: Tensor
    n_targets: Tensor
    n_correct: Tensor


class MaskedLMLoss:
    """The objective the training and evaluation steps call (see the module docstring)."""

    ignore_index = IGNORE_INDEX

    def targets_in(self, targets: Tensor) -> Tensor:
        """Scored positions of a micro-batch (the step all-reduces their sum before the forward)."""
        return count_targets(targets)

    def __call__(self, logits: Tensor, targets: Tensor) -> LossSums:
        loss_sum, n_targets = mlm_loss(logits, targets, reduction="sum")
        with torch.no_grad():
            n_correct = ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
        return LossSums(loss_sum, n_targets, n_correct)
