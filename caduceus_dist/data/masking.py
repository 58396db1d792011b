"""Reference MLM corruption (docs/reference-recipe.md §3, §4), vectorised over whole batches.

Per position, independently: N becomes [PAD] first; then with probability `mlm_probability` the
position is selected (no token type is excluded, so [PAD] positions can be selected, and keep
target [PAD]); selected positions become [MASK] with probability `mask_fraction`, a uniform id in
[0, 12) with probability `random_fraction`, and stay otherwise; targets are the original id at
selected positions and [PAD] (4, ignored by the loss) elsewhere. N -> [PAD] and the
reverse-complement augmentation are applied to the crop before (`crops.py`), as the reference does.
A target keeps the soft-mask flag of its base (16, docs/shard-format.md §1) for the loss weighting;
`transfer.to_torch` splits it off into `target_softmasked`. Inputs never carry it.

One uint32 u per position decides everything (thresholds on u): selected iff u < t_sel, [MASK]
iff u < t_mask, random iff t_mask <= u < t_rand, and the random id is (u - t_mask) * 12 //
(t_rand - t_mask), uniform to within 1e-7. The stream of row i is keyed by the crop's identity
(seed, epoch, sample id, offset, length), never by rank or worker.

Two implementations, bitwise equal (tests/test_data_masking.py checks it): the native kernel
`caduceus_dist/native/mlm_mask.c` does N -> [PAD], reverse complement, draws and 80/10/10 in one pass
per token straight from the stored crops (about 4x faster); the NumPy path (`CADUCEUS_NATIVE=0` or no
C compiler) orients the crops, then runs `mask_batch`, whose per-token
steps are branch-free uint8/uint32 arithmetic over cache-sized blocks (masked selects such as
np.where cost 10x more per token here) and only the ~1.5% randomly replaced positions go by index.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np

from caduceus_dist import native
from caduceus_dist.data.crops import FORWARD_LUT, REVERSE_LUT, orient
from caduceus_dist.data.cursor import BLOCK_TOKENS, UniformStream, token_blocks
from caduceus_dist.model.tokenizer import MASK_ID, PAD_ID, VOCAB_SIZE
from caduceus_dist.shard_format import SOFTMASK_FLAG

_SCALE = 1 << 32


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


class _Scratch:
    """Block-sized temporaries, allocated once per batch."""

    def __init__(self):
        self.u8 = np.empty(BLOCK_TOKENS, dtype=np.uint8)
        self.flags = np.empty((2, BLOCK_TOKENS), dtype=bool)

    def like(self, shape):
        size = shape[0] * shape[1]
        return (self.u8[:size].reshape(shape), self.flags[0, :size].reshape(shape), self.flags[1, :size].reshape(shape))


def _below(u: np.ndarray, threshold: int, out: np.ndarray) -> np.ndarray:
    """u < threshold for uint32 u and 0 <= threshold <= 2^32, without upcasting u."""
    if threshold <= 0:
        out[...] = False
        return out
    return np.less_equal(u, np.uint32(threshold - 1), out=out)


def _outputs(out: np.ndarray | None, rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    if out is None:
        out = np.empty((2, rows, length), dtype=np.uint8)
    if out.shape != (2, rows, length) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous uint8 array of shape {(2, rows, length)}, got {out.dtype} {out.shape}")
    return out[0], out[1]


def mask_batch(tokens: np.ndarray, keys: np.ndarray, policy: MaskingPolicy,
               out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) uint8 (B, L) from prepared tokens (B, L) uint8 (soft-mask flag allowed) and one uint64 key per row
    (written to out[0], out[1] when `out` (2, B, L) is given)."""
    t_sel, t_mask, t_rand = policy.thresholds()
    inputs, targets = _outputs(out, *tokens.shape)
    stream = UniformStream(keys, tokens.shape[1])
    scratch = _Scratch()
    for rows, col, cols in token_blocks(*tokens.shape):
        u = stream.block(rows, col, cols)
        tok, inp, tgt = (a[rows, col:col + cols] for a in (tokens, inputs, targets))
        tmp, flag, bool_b = scratch.like(tok.shape)
        # targets = tok where selected, else [PAD]:  PAD + (tok - PAD) * selected  (uint8 wrap-around)
        selected = _below(u, t_sel, flag)
        np.subtract(tok, np.uint8(PAD_ID), out=tgt)
        tgt *= selected.view(np.uint8)
        tgt += np.uint8(PAD_ID)
        # inputs = [MASK] where u < t_mask, else the id (flag dropped):  id - (id - MASK) * masked
        masked = _below(u, t_mask, bool_b)
        np.bitwise_and(tok, np.uint8(SOFTMASK_FLAG - 1), out=inp)
        np.subtract(inp, np.uint8(MASK_ID), out=tmp)
        tmp *= masked.view(np.uint8)
        inp -= tmp
        if t_rand > t_mask:  # t_mask <= u < t_rand: a uniform id from the position of u inside that band
            selected ^= masked  # selected, not [MASK]: ~3% of positions; the band test is done on those only
            kept = np.flatnonzero(selected)  # a block is whole rows or part of one row: contiguous
            drawn = u.reshape(-1)[kept].astype(np.uint64) - np.uint64(t_mask)
            band = drawn < np.uint64(t_rand - t_mask)
            ids = (drawn[band] * np.uint64(VOCAB_SIZE) // np.uint64(t_rand - t_mask)).astype(np.uint8)
            inp.reshape(-1)[kept[band]] = ids
    return inputs, targets


def _mask_oriented(stored: np.ndarray, strands: np.ndarray, keys: np.ndarray, policy: MaskingPolicy,
                   out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    return mask_batch(orient(stored, strands), keys, policy, out)


_POINTER, _I64, _U64, _U8 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint8


@functools.cache
def _kernel():
    """mlm_mask_crops of the native library (argument types declared once per process), or None."""
    lib = native.load("mlm_mask")
    if lib is None:
        return None
    kernel = lib.mlm_mask_crops
    kernel.argtypes = [_POINTER] * 5 + [_I64, _I64, _POINTER, _POINTER, _U64, _U64, _U64, _U64, _U8, _U8,
                                        _POINTER, _POINTER]
    kernel.restype = ctypes.c_int
    return kernel


def _mask_in_place(stored: np.ndarray, strands: np.ndarray, keys: np.ndarray, policy: MaskingPolicy,
                   out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("masking backend 'native' is unavailable (CADUCEUS_NATIVE=0 or no C compiler); "
                           "use the 'numpy' backend or leave the backend unset")
    t_sel, t_mask, t_rand = policy.thresholds()
    rows, length = stored.shape
    inputs, targets = _outputs(out, rows, length)
    stored = np.ascontiguousarray(stored, dtype=np.uint8)
    order = np.arange(rows, dtype=np.int64)
    starts = order * length
    reverse = np.ascontiguousarray(strands, dtype=np.uint8)
    keys = np.ascontiguousarray(keys, dtype=np.uint64).reshape(-1)
    kernel(stored.ctypes.data, starts.ctypes.data, reverse.ctypes.data, keys.ctypes.data, order.ctypes.data, rows,
           length, FORWARD_LUT.ctypes.data, REVERSE_LUT.ctypes.data, t_sel, t_mask, t_rand, VOCAB_SIZE, MASK_ID,
           PAD_ID, inputs.ctypes.data, targets.ctypes.data)
    return inputs, targets


# backend name -> (stored crops, strands, keys, policy, out) -> (inputs, targets)
MASKERS = {"native": _mask_in_place, "numpy": _mask_oriented}


def default_masker() -> str:
    return "native" if _kernel() is not None else "numpy"


def masked_crops(stored: np.ndarray, strands: np.ndarray, keys: np.ndarray, policy: MaskingPolicy,
                 backend: str | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) uint8 (B, L) of the stored crops `stored` (B, L), reverse-complemented where
    strands[i], row i masked with keys[i]; written to out[0], out[1] when a (2, B, L) buffer is given.

    The same bytes with either backend; the default is the native one where it compiled.
    """
    return MASKERS[backend or default_masker()](stored, strands, keys, policy, out)
