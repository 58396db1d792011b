"""The masked-language-model loss: which positions are scored, how they are counted, how they are summed.

The training step calls this component and nothing else to turn logits into a loss, so a new objective
or a per-position weighting (down-weighting soft-masked repeats, `LossConfig.softmask_weight`) changes
this module only, never an engine. The reference loss (docs/reference-model.md §9): cross-entropy in fp32 over the positions
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
    and hits (0-d tensors; nothing here reads a value on the host). With a soft-mask weight below 1 all
    three are weighted: each target counts its weight (1, or softmask_weight where soft-masked)."""

    loss_sum: Tensor
    n_targets: Tensor
    n_correct: Tensor


# what evaluation sums per batch: unweighted loss / targets / hits, and loss / targets on upper-case bases only
EVAL_SUMS = ("loss_sum", "n_targets", "n_correct", "upper_loss_sum", "upper_targets")


class MaskedLMLoss:
    """The objective the training and evaluation steps call (see the module docstring).

    Training loss with soft-mask weight w: sum_i w_i CE_i / sum_i w_i over the scored targets of the global
    batch, w_i = w where target i's base was lower case, else 1 (a weighted mean: the step's size does not
    shrink with the repeat content of the batch). w = 1 takes the reference's unweighted path, bit for bit.
    """

    ignore_index = IGNORE_INDEX

    def __init__(self, softmask_weight: float = 1.0):
        self.softmask_weight = softmask_weight

    def _weights(self, targets: Tensor, softmasked: Tensor | None) -> Tensor | None:
        """Per-position weights (0 where not scored), or None for the unweighted reference path."""
        if self.softmask_weight == 1.0 or softmasked is None:
            return None
        weights = torch.where(softmasked, self.softmask_weight, 1.0)
        return weights * (targets != IGNORE_INDEX)

    def targets_in(self, targets: Tensor, softmasked: Tensor | None = None) -> Tensor:
        """The (weighted) target count of a micro-batch (the step all-reduces their sum before the forward)."""
        weights = self._weights(targets, softmasked)
        return count_targets(targets) if weights is None else weights.sum(dtype=torch.float64)

    def __call__(self, logits: Tensor, targets: Tensor, softmasked: Tensor | None = None) -> LossSums:
        weights = self._weights(targets, softmasked)
        if weights is None:
            loss_sum, n_targets = mlm_loss(logits, targets, reduction="sum")
            with torch.no_grad():
                n_correct = ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
            return LossSums(loss_sum, n_targets, n_correct)
        per_position = _per_position(logits, targets)
        with torch.no_grad():
            n_correct = ((logits.argmax(-1) == targets) * weights).sum(dtype=torch.float64)
        return LossSums((per_position * weights).sum(), weights.sum(dtype=torch.float64), n_correct)

    @torch.no_grad()
    def evaluation(self, logits: Tensor, targets: Tensor, softmasked: Tensor | None = None) -> dict[str, Tensor]:
        """EVAL_SUMS of a batch, never weighted: the loss over all targets, and over upper-case bases only."""
        per_position = _per_position(logits, targets)
        scored = targets != IGNORE_INDEX
        upper = scored if softmasked is None else scored & ~softmasked
        return {"loss_sum": per_position.sum(dtype=torch.float64), "n_targets": scored.sum(),
                "n_correct": ((logits.argmax(-1) == targets) & scored).sum(),
                "upper_loss_sum": (per_position * upper).sum(dtype=torch.float64), "upper_targets": upper.sum()}


def _per_position(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per position in fp32, 0 where the target is not scored; shaped like targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none").reshape(targets.shape)
