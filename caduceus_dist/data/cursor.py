"""The order of one genome's crops as a pure function of (seed, source, length, crop number): no state but numbers.

A source's stream at crop length L is the sequence of its crops of L bases: crop number c lies in epoch
e = c // C (C = windows x window / L, every stored base once per epoch), and the c-th crop is crop
pi_e(c mod C) of the split, where pi_e is a keyed permutation of all C crops (window w, offset j*L for
crop w * (window / L) + j). So consecutive crops come from anywhere in the genome, as if every crop
were drawn independently but without replacement within an epoch (docs/loading.md, "Batch diversity").

Epochs are counted in tokens (e = c*L // (windows x window)), the same boundaries at every length. A
curriculum stage change starts the permutation of the new length at the same token position: within
that epoch the new stage may repeat bases the old one already gave, and leave others out (at most one
epoch is affected; every later epoch covers every base once).

Randomness comes from SplitMix64 (Steele et al. 2014) applied to counters, vectorised over numpy
uint64 arrays; the permutations are 4-round Feistel networks with cycle walking.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_FEISTEL_ROUNDS = 4

# Domain-separation tags for the independent random streams.
TAG_CROPS, TAG_MASK, TAG_STRAND, TAG_MIX, TAG_ROWS = 0x43524F50, 0x4D41534B, 0x5354524E, 0x4D495854, 0x524F5753


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (a bijection of uint64 with full avalanche); returns a new array.

    Array arithmetic wraps silently; callers passing 0-d values wrap the call in np.errstate.
    """
    z = np.array(x, dtype=np.uint64, copy=True)
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


_U64 = (1 << 64) - 1


def _mix64_int(z: int) -> int:
    """mix64 for one Python int (scalar keys: ~50x cheaper than a 0-d numpy array)."""
    z ^= z >> 30
    z = (z * int(_MIX1)) & _U64
    z ^= z >> 27
    z = (z * int(_MIX2)) & _U64
    return z ^ (z >> 31)


def derive_key(*parts) -> np.ndarray:
    """Hash a tuple of integers / integer arrays (broadcast together) into uint64 keys.

    Leading scalar parts are folded with Python ints; numpy work starts at the first array part.
    """
    key, rest = 0, list(parts)
    while rest and np.ndim(rest[0]) == 0:
        key = _mix64_int((key + int(GOLDEN) + (int(rest.pop(0)) & _U64)) & _U64)
    if not rest:
        return np.uint64(key)
    key = np.uint64(key)
    with np.errstate(over="ignore"):
        for part in rest:
            key = mix64(key + GOLDEN + np.asarray(part).astype(np.uint64))
    return key


BLOCK_TOKENS = 1 << 15  # tokens per pass of the hot loops: temporaries stay in L2 cache


def _mix_inplace(z: np.ndarray, tmp: np.ndarray) -> None:
    np.right_shift(z, np.uint64(30), out=tmp)
    z ^= tmp
    z *= _MIX1
    np.right_shift(z, np.uint64(27), out=tmp)
    z ^= tmp
    z *= _MIX2
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp


def token_blocks(rows: int, length: int):
    """Cover a (rows, length) array with blocks of about BLOCK_TOKENS: (row slice, first column, columns).

    First columns are even, so each block starts on a whole SplitMix64 draw (two uint32 values).
    """
    if length <= BLOCK_TOKENS:
        step = max(1, BLOCK_TOKENS // length)
        for first in range(0, rows, step):
            yield slice(first, min(rows, first + step)), 0, length
    else:
        for row in range(rows):
            for col in range(0, length, BLOCK_TOKENS):
                yield slice(row, row + 1), col, min(BLOCK_TOKENS, length - col)


@functools.lru_cache(maxsize=8)
def _weyl_counters(pairs: int) -> np.ndarray:
    """SplitMix64's state increments 1..pairs times the golden gamma (read-only, shared)."""
    counters = np.arange(1, pairs + 1, dtype=np.uint64) * GOLDEN
    counters.flags.writeable = False
    return counters


class UniformStream:
    """uint32 values of the per-row SplitMix64 streams (row i seeded with keys[i]), block by block."""

    def __init__(self, keys: np.ndarray, length: int):
        self.keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
        self.counters = _weyl_counters((length + 1) // 2)
        self._z = np.empty(BLOCK_TOKENS // 2 + 1, dtype=np.uint64)
        self._tmp = np.empty_like(self._z)

    def block(self, rows: slice, first_col: int, cols: int) -> np.ndarray:
        """(rows, cols) uint32 view, valid until the next call."""
        keys = self.keys[rows]
        pairs = (cols + 1) // 2
        z = self._z[:len(keys) * pairs].reshape(len(keys), pairs)
        np.add(self.counters[first_col // 2:first_col // 2 + pairs], keys[:, None], out=z)
        _mix_inplace(z, self._tmp[:z.size].reshape(z.shape))
        return z.view(np.uint32)[:, :cols]


def uniform_float(keys: np.ndarray) -> np.ndarray:
    """One float64 in [0, 1) per key."""
    return (mix64(keys) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@functools.lru_cache(maxsize=256)
def _round_keys(key: int) -> tuple[np.uint64, ...]:
    return tuple(derive_key(key, r) for r in range(_FEISTEL_ROUNDS))


def feistel_permute(x: np.ndarray, n: int, key: int) -> np.ndarray:
    """Keyed bijection of [0, n) applied to every element of x (all < n)."""
    half = np.uint64((max(1, int(n - 1).bit_length()) + 1) // 2)  # 4^half >= n: cycle walking takes < 4 tries
    mask = (np.uint64(1) << half) - np.uint64(1)
    round_keys = _round_keys(int(key))

    def once(v):
        left, right = v >> half, v & mask
        for rk in round_keys:
            left, right = right, left ^ (mix64(right ^ rk) & mask)
        return (left << half) | right

    y = once(np.asarray(x, dtype=np.uint64).reshape(-1))
    pending = np.flatnonzero(y >= np.uint64(n))
    while pending.size:  # cycle walking: re-encrypt the values that fell outside [0, n)
        y[pending] = once(y[pending])
        pending = pending[y[pending] >= np.uint64(n)]
    return y.astype(np.int64)


@dataclass(frozen=True)
class Located:
    """Where crops land: epoch, stored window (sample id) and token offset in it."""

    epoch: np.ndarray
    sample_id: np.ndarray
    offset: np.ndarray


class CropOrder:
    """Crop number -> (epoch, sample id, offset) for one source; see the module docstring."""

    def __init__(self, sample_ids: np.ndarray, window: int, seed: int, source_key: int):
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64)
        self.windows = len(self.sample_ids)
        if self.windows == 0:
            raise ValueError("no windows to read (every shard of the split is empty or was skipped)")
        self.window, self.seed, self.source_key = window, seed, source_key
        self.epoch_tokens = self.windows * window

    def locate(self, crops: np.ndarray, length: int) -> Located:
        if self.window % length:
            raise ValueError(f"crop length {length} must divide the window {self.window}")
        crops = np.asarray(crops, dtype=np.int64)
        per_window = self.window // length
        per_epoch = self.windows * per_window
        epoch, index = np.divmod(crops, per_epoch)
        crop = np.empty_like(crops)
        for e in np.unique(epoch).tolist():
            rows = np.flatnonzero(epoch == e)
            crop[rows] = feistel_permute(index[rows], per_epoch,
                                         int(derive_key(self.seed, TAG_CROPS, self.source_key, length, e)))
        window_rank, within = np.divmod(crop, per_window)
        return Located(epoch, self.sample_ids[window_rank], within * length)
