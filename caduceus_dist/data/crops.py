"""From stored windows to the (B, L) crops of a batch: reverse complement and N -> [PAD] (spec 3.2-3.3).

Each worker process keeps an arena of recently read windows, N -> [PAD] already applied, in both
orientations (the reverse complement is made on first use). Viewed as rows of L tokens, the arena
makes a whole batch one fancy-index gather: the reverse complement of the crop at offset o is the
crop at offset W - o - L of the reversed window. A window is read and decompressed once per shuffle
group per worker (the arena holds `capacity` windows, least recently used out first).
Memory per worker: capacity x 2 x window bytes (64 x 2 x 128 KiB = 16 MiB by default).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from caduceus_dist.model.tokenizer import COMPLEMENT_IDS, N_ID, PAD_ID, VOCAB_SIZE

# uint8 -> uint8 lookup tables: N -> [PAD] (applied once per window read); base complement ([PAD] stays).
_N_TO_PAD = np.arange(256, dtype=np.uint8)
_N_TO_PAD[N_ID] = PAD_ID
_COMPLEMENT = np.arange(256, dtype=np.uint8)
_COMPLEMENT[:VOCAB_SIZE] = COMPLEMENT_IDS


class CropSource:
    """Crops of stored windows, read through `read_window(sample_id) -> uint8 array of length window`."""

    def __init__(self, read_window: Callable[[int], np.ndarray], window: int, capacity: int):
        self.read_window, self.window, self.capacity = read_window, window, max(1, capacity)
        self._arena: np.ndarray | None = None  # (capacity, 2, window): allocated in the process that reads
        self._slots: OrderedDict[int, int] = OrderedDict()  # sample id -> arena slot, least recent first
        self._has_reverse = np.zeros(self.capacity, dtype=bool)

    def __getstate__(self):  # a DataLoader worker starts with an empty arena of its own
        state = self.__dict__.copy()
        state["_arena"], state["_slots"] = None, OrderedDict()
        state["_has_reverse"] = np.zeros(self.capacity, dtype=bool)
        return state

    def _resident(self, samples: list[int]) -> np.ndarray:
        """Arena slots of `samples` (at most `capacity` of them), reading the windows not yet there."""
        if self._arena is None:
            self._arena = np.empty((self.capacity, 2, self.window), dtype=np.uint8)
        slots = np.empty(len(samples), dtype=np.int64)
        for i, sample in enumerate(samples):
            slot = self._slots.get(sample)
            if slot is None:
                # the evicted window is older than every sample already placed by this call
                slot = len(self._slots) if len(self._slots) < self.capacity else self._slots.popitem(last=False)[1]
                np.take(_N_TO_PAD, self.read_window(sample), out=self._arena[slot, 0])
                self._has_reverse[slot] = False
            else:
                self._slots.move_to_end(sample)
            self._slots[sample] = slots[i] = slot
        return slots

    def gather(self, sample_ids: np.ndarray, offsets: np.ndarray, strands: np.ndarray, length: int) -> np.ndarray:
        """(B, length) uint8: row i = window sample_ids[i] at offsets[i], reverse-complemented where strands[i]."""
        if self.window % length or np.any(offsets % length):
            raise ValueError(f"crop length {length} must divide the window {self.window} and every offset")
        out = np.empty((len(sample_ids), length), dtype=np.uint8)
        if not len(out):  # an evaluation rank may get an empty slice of the last batch
            return out
        crops = self.window // length
        strands = np.asarray(strands, dtype=np.int64)
        index = np.where(strands == 1, crops - 1 - offsets // length, offsets // length)
        unique, which = np.unique(sample_ids, return_inverse=True)
        for first in range(0, len(unique), self.capacity):  # one pass unless a batch spans > capacity windows
            slots = self._resident(unique[first:first + self.capacity].tolist())
            rows = np.flatnonzero((which >= first) & (which < first + len(slots)))
            row_slots = slots[which[rows] - first]
            for slot in np.unique(row_slots[strands[rows] == 1]).tolist():
                if not self._has_reverse[slot]:
                    np.take(_COMPLEMENT, self._arena[slot, 0, ::-1], out=self._arena[slot, 1])
                    self._has_reverse[slot] = True
            arena_rows = self._arena.reshape(-1, length)  # row (slot * 2 + strand) * crops + crop index
            picked = (row_slots * 2 + strands[rows]) * crops + index[rows]
            if len(rows) == len(out):
                return arena_rows[picked]  # the common case: one gather, no copy into `out`
            out[rows] = arena_rows[picked]
        return out
