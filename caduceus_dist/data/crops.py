"""From stored bytes to the crops the model sees: reverse complement and N -> [PAD] (docs/reference-recipe.md §2, §3).

The builder reads a batch's crops, as stored, into one (B, L) buffer (`ShardSplit.read_crops`: version 3
shards decode only the crops' bases). The native masking kernel then reads each row forwards, or
backwards through the complement table for the reverse strand; the NumPy path `orient`s the rows
first. Both tables keep the soft-mask flag (16) of a stored byte, so it reaches the targets.
"""

from __future__ import annotations

import numpy as np

from caduceus_dist.model.tokenizer import COMPLEMENT_IDS, N_ID, PAD_ID, VOCAB_SIZE
from caduceus_dist.shard_format import SOFTMASK_FLAG


def _with_flag(lut: np.ndarray) -> np.ndarray:
    """The table also maps a soft-masked byte (id | flag) to its token | flag: the flag rides to the targets."""
    lut[SOFTMASK_FLAG:2 * SOFTMASK_FLAG] = lut[:SOFTMASK_FLAG] | SOFTMASK_FLAG
    return lut


# stored byte -> token of the crop: N -> [PAD] on the forward strand; complement of that on the reverse one
FORWARD_LUT = np.arange(256, dtype=np.uint8)
FORWARD_LUT[N_ID] = PAD_ID
_COMPLEMENT = np.arange(256, dtype=np.uint8)
_COMPLEMENT[:VOCAB_SIZE] = COMPLEMENT_IDS
REVERSE_LUT = _with_flag(_COMPLEMENT[FORWARD_LUT])
FORWARD_LUT = _with_flag(FORWARD_LUT)


def orient(stored: np.ndarray, strands: np.ndarray) -> np.ndarray:
    """(B, L) crop tokens of stored crops: reverse-complemented where strands[i], N -> [PAD], flags kept
    (the NumPy path; the native kernel reads `stored` in place instead)."""
    out = np.empty_like(stored)
    reverse = np.asarray(strands) == 1
    out[~reverse] = np.take(FORWARD_LUT, stored[~reverse])
    out[reverse] = np.take(REVERSE_LUT, stored[reverse, ::-1])
    return out
