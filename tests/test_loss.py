"""The loss component: soft-mask weighting against a hand computation, and the evaluation sums."""

from __future__ import annotations

import math

import pytest
import torch

from caduceus_dist.loss import LossConfig, MaskedLMLoss, mlm_loss
from caduceus_dist.model.tokenizer import PAD_ID


def batch():
    """Two rows of four positions: targets with [PAD] (not scored), and which targets were lower case."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16)
    targets = torch.tensor([[7, PAD_ID, 9, 10], [8, 8, PAD_ID, 11]])
    softmasked = torch.tensor([[True, True, False, True], [False, True, True, False]])
    return logits, targets, softmasked


def cross_entropy(logits: list, row: int, col: int, target: int) -> float:
    values = logits[row][col]
    return -math.log(math.exp(values[target]) / sum(math.exp(v) for v in values))


def test_softmask_weight_equals_a_hand_computed_weighted_mean():
    logits, targets, softmasked = batch()
    weight = 0.1
    numerator = denominator = 0.0
    for row in range(2):
        for col in range(4):
            target = int(targets[row, col])
            if target == PAD_ID:
                continue
            w = weight if softmasked[row, col] else 1.0
            numerator += w * cross_entropy(logits.tolist(), row, col, target)
            denominator += w
    loss = MaskedLMLoss(weight)
    sums = loss(logits, targets, softmasked)
    assert float(sums.n_targets) == pytest.approx(denominator) == 1.0 + 1.0 + 0.1 + 1.0 + 0.1 + 0.1
    assert float(loss.targets_in(targets, softmasked)) == pytest.approx(denominator)
    assert float(sums.loss_sum) / float(sums.n_targets) == pytest.approx(numerator / denominator, rel=1e-6)
    hits = (logits.argmax(-1) == targets) & (targets != PAD_ID)
    assert float(sums.n_correct) == pytest.approx(float((hits * torch.where(softmasked, weight, 1.0)).sum()))


def test_weight_one_is_the_reference_loss_bit_for_bit_and_ignores_the_flags():
    logits, targets, softmasked = batch()
    reference, count = mlm_loss(logits, targets, reduction="sum")
    for flags in (softmasked, None):
        sums = MaskedLMLoss(1.0)(logits, targets, flags)
        assert torch.equal(sums.loss_sum, reference) and int(sums.n_targets) == int(count) == 6


def test_weight_zero_trains_on_upper_case_bases_only():
    logits, targets, softmasked = batch()
    sums = MaskedLMLoss(0.0)(logits, targets, softmasked)
    upper = targets.clone()
    upper[softmasked] = PAD_ID
    reference, count = mlm_loss(logits, upper, reduction="sum")
    assert float(sums.n_targets) == int(count) == 3
    assert float(sums.loss_sum) == pytest.approx(float(reference), rel=1e-6)


def test_evaluation_is_unweighted_and_reports_upper_case_bases_apart():
    logits, targets, softmasked = batch()
    sums = MaskedLMLoss(0.1).evaluation(logits, targets, softmasked)
    total, count = mlm_loss(logits, targets, reduction="sum")
    upper = targets.clone()
    upper[softmasked] = PAD_ID
    upper_total, upper_count = mlm_loss(logits, upper, reduction="sum")
    assert float(sums["loss_sum"]) == pytest.approx(float(total), rel=1e-6) and int(sums["n_targets"]) == int(count)
    assert float(sums["upper_loss_sum"]) == pytest.approx(float(upper_total), rel=1e-6)
    assert int(sums["upper_targets"]) == int(upper_count) == 3


def test_softmask_weight_outside_zero_one_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"loss.softmask_weight must be in \[0, 1\], got 1.5"):
        LossConfig(1.5).validate()
