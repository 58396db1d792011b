"""From stored windows to the (B, L) crops of a batch: reverse complement and N -> [PAD] (docs/reference-recipe.md §2, §3).

Each worker process keeps an arena of recently read windows, as stored (token ids). A crop is a
run of the arena: the native masking kernel reads it in place (forwards, or backwards through the
complement table for the reverse strand), so a window is decompressed and copied into the arena
once and never mapped or reversed as a whole. The NumPy path `gather`s the crops into a (B, L)
array first. A window is read once
per shuffle group per worker (the arena holds `capacity` windows, least recently used out first).
Memory per worker: capacity x window bytes (training: 2 x 64 x 128 KiB = 16 MiB by default).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np

from caduceus_dist.model.tokenizer import COMPLEMENT_IDS, N_ID, PAD_ID, VOCAB_SIZE

# stored byte -> token of the crop: N -> [PAD] on the forward strand; complement of that on the reverse one
FORWARD_LUT = np.arange(256, dtype=np.uint8)
FORWARD_LUT[N_ID] = PAD_ID
_COMPLEMENT = np.arange(256, dtype=np.uint8)
_COMPLEMENT[:VOCAB_SIZE] = COMPLEMENT_IDS
REVERSE_LUT = _COMPLEMENT[FORWARD_LUT]


class CropSource:
    """Crops of stored windows, read through `read_window(sample_id) -> uint8 array of length window`."""

    def __init__(self, read_window: Callable[[int], np.ndarray], window: int, capacity: int):
        self.read_window, self.window, self.capacity = read_window, window, max(1, capacity)
        self.__dict__.update(self._empty_arena())

    def _empty_arena(self) -> dict:
        return {
            "_arena": None,  # (capacity, window): allocated in the process that reads
            "_slots": OrderedDict(),  # sample id -> arena slot, least recent first
            "_free": list(range(self.capacity - 1, -1, -1)),  # slots holding no window
        }

    def __getstate__(self):  # a DataLoader worker starts with an empty arena of its own
        return {**self.__dict__, **self._empty_arena()}

    @property
    def arena(self) -> np.ndarray:
        """The resident windows, flat: crop starts from `placed` index into this."""
        if self._arena is None:
            self._arena = np.empty(self.capacity * self.window, dtype=np.uint8)
        return self._arena

    def _resident(self, samples: list[int]) -> np.ndarray:
        """Arena slots of `samples` (at most `capacity` of them), reading the windows not yet there."""
        arena = self.arena.reshape(self.capacity, self.window)
        slots = np.empty(len(samples), dtype=np.int64)
        for i, sample in enumerate(samples):
            slot = self._slots.get(sample)
            if slot is None:
                # the evicted window is older than every sample already placed by this call
                slot = self._free.pop() if self._free else self._slots.popitem(last=False)[1]
                try:
                    arena[slot] = self.read_window(sample)
                except BaseException:
                    self._free.append(slot)  # it holds no window now: never hand out a slot still in use
                    raise
            else:
                self._slots.move_to_end(sample)
            self._slots[sample] = slots[i] = slot
        return slots

    def placed(self, sample_ids: np.ndarray, offsets: np.ndarray, length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(batch rows, arena start of each of their crops), for groups of rows whose windows fit the arena.

        One group unless the batch spans more than `capacity` windows; the arena holds a group's
        windows until the next one is requested, so consume each group before asking for the next.
        """
        if self.window % length or np.any(offsets % length):
            raise ValueError(f"crop length {length} must divide the window {self.window} and every offset")
        if not len(sample_ids):  # an evaluation rank may get an empty slice of the last batch
            return
        unique, which = np.unique(sample_ids, return_inverse=True)
        for first in range(0, len(unique), self.capacity):
            slots = self._resident(unique[first:first + self.capacity].tolist())
            if len(slots) == len(unique):  # the common case: every row, no selection
                yield np.arange(len(sample_ids)), slots[which] * self.window + offsets
                return
            rows = np.flatnonzero((which >= first) & (which < first + len(slots)))
            yield rows, slots[which[rows] - first] * self.window + offsets[rows]

    def gather(self, sample_ids: np.ndarray, offsets: np.ndarray, strands: np.ndarray, length: int) -> np.ndarray:
        """(B, length) uint8: row i = window sample_ids[i] at offsets[i], reverse-complemented where strands[i],
        N -> [PAD] (the NumPy path; the native kernel reads the arena in place instead)."""
        out = np.empty((len(sample_ids), length), dtype=np.uint8)
        strands = np.asarray(strands, dtype=np.int64)
        for rows, starts in self.placed(sample_ids, offsets, length):
            crops = self.arena.reshape(-1, length)[starts // length]  # starts are multiples of length
            reverse = strands[rows] == 1
            out[rows[~reverse]] = np.take(FORWARD_LUT, crops[~reverse])
            out[rows[reverse]] = np.take(REVERSE_LUT, crops[reverse, ::-1])
        return out
