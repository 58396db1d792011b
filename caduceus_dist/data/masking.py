"""Reference MLM corruption (spec 3.3 to 3.5), vectorised over whole batches.

Per position, independently: N becomes [PAD] first; then with probability `mlm_probability` the
position is selected (no token type is excluded, so [PAD] positions can be selected, and keep
target [PAD]); selected positions become [MASK] with probability `mask_fraction`, a uniform id in
[0, 12) with probability `random_fraction`, and stay otherwise; targets are the original id at
selected positions and [PAD] (4, ignored by the loss) elsewhere. Reverse-complement augmentation
is applied to the crop before all of this, as the reference does before tokenising.

One uint32 u per position decides everything (thresholds on u): selected iff u < t_sel, [MASK]
iff u < t_mask, random iff t_mask <= u < t_rand, and the random id is (u - t_mask) * 12 //
(t_rand - t_mask), uniform to within 1e-7. The stream of row i is keyed by the crop's identity
(seed, epoch, sample id, offset, length), never by rank or worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from caduceus_dist.data.cursor import uniform_u32
from caduceus_dist.model.tokenizer import COMPLEMENT_IDS, MASK_ID, N_ID, PAD_ID, VOCAB_SIZE

_SCALE = 1 << 32

# Token LUTs (uint8 -> uint8): N -> [PAD] for the forward strand; complement then N -> [PAD] for RC.
_FORWARD_LUT = np.arange(256, dtype=np.uint8)
_FORWARD_LUT[N_ID] = PAD_ID
_REVERSE_LUT = _FORWARD_LUT.copy()
_REVERSE_LUT[:VOCAB_SIZE] = _FORWARD_LUT[COMPLEMENT_IDS]


@dataclass(frozen=True)
class MaskingPolicy:
    mlm_probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def thresholds(self) -> tuple[int, int, int]:
        t_sel = round(self.mlm_probability * _SCALE)
        t_mask = round(self.mlm_probability * self.mask_fraction * _SCALE)
        t_rand = round(self.mlm_probability * (self.mask_fraction + self.random_fraction) * _SCALE)
        return t_sel, t_mask, min(t_rand, t_sel)


def _below(u: np.ndarray, threshold: int) -> np.ndarray:
    """u < threshold for uint32 u and 0 <= threshold <= 2^32, without upcasting u."""
    if threshold <= 0:
        return np.zeros(u.shape, dtype=bool)
    return u <= np.uint32(threshold - 1)


def prepare_crop(window: np.ndarray, offset: int, length: int, reverse: bool, out: np.ndarray) -> None:
    """Write the crop window[offset:offset+length] into `out`, RC'd if asked, with N -> [PAD]."""
    crop = window[offset:offset + length]
    if reverse:
        np.take(_REVERSE_LUT, crop[::-1], out=out)
    else:
        np.take(_FORWARD_LUT, crop, out=out)


def mask_batch(tokens: np.ndarray, keys: np.ndarray, policy: MaskingPolicy) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) uint8 (B, L) from prepared tokens (B, L) uint8 and one uint64 key per row."""
    t_sel, t_mask, t_rand = policy.thresholds()
    u = uniform_u32(keys, tokens.shape[1])
    targets = np.where(_below(u, t_sel), tokens, np.uint8(PAD_ID))
    inputs = tokens.copy()
    np.putmask(inputs, _below(u, t_mask), np.uint8(MASK_ID))
    if t_rand > t_mask:
        random_pos = np.flatnonzero(_below(u, t_rand) & ~_below(u, t_mask))
        drawn = u.reshape(-1)[random_pos].astype(np.uint64) - np.uint64(t_mask)
        inputs.reshape(-1)[random_pos] = (drawn * np.uint64(VOCAB_SIZE) // np.uint64(t_rand - t_mask)).astype(np.uint8)
    return inputs, targets
