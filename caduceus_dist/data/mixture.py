"""Which source (genome) each row of a step comes from, and how far each source's stream has got.

Weights: source k has weight w_k(s) at step s (`data.sources[].weight`, or the phase of
`data.mixture_schedule` that step s falls in), normalised to sum 1, cumulative C_k = w_1 + ... + w_k.

Rows per step (systematic rounding, docs/loading.md "Mixtures"): with R rows in the step and one uniform
u_s in [0, 1) drawn from (seed, step), source k gets the rows between boundaries b_{k-1} and b_k,
b_k = floor(R C_k + u_s). So every source's count is floor or ceil of R w_k (within one row), its
expectation is exactly R w_k, the counts add up to R, and a weight of 0 gives no row ever. Which rows
of the step go to which source is a keyed permutation of the step's rows, so each rank's micro-batches
mix the sources too.

Positions: each source has its own stream of crops (`cursor.CropOrder`), and its own token position:
the tokens its rows consumed in all earlier steps. A small source goes through its epochs while a large
one is still in its first. Positions are sums over steps of pure functions of (seed, step), computed
in vectorised blocks and cached, so a step's rows are the same at any world size and after any resume.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from caduceus_dist.data.config import DataConfig
from caduceus_dist.data.curriculum import DataPlanError, Schedule
from caduceus_dist.data.cursor import TAG_MIX, TAG_ROWS, derive_key, feistel_permute, uniform_float

DEFAULT_SOURCE = "default"  # the name of the one source of `data.shards`
BLOCK_STEPS = 1 << 14  # steps per vectorised block when positions are advanced
CACHE_EVERY = 256  # positions are kept at every multiple of this many steps


def source_key(name: str) -> int:
    """The source's part of its random keys: from its name, so reordering the sources changes nothing."""
    return int.from_bytes(hashlib.blake2s(name.encode(), digest_size=8).digest(), "little")


def source_weights(cfg: DataConfig) -> tuple[list[str], list[tuple[int | None, int | None, dict[str, float]]]]:
    """Source names and phases (start step, start tokens, weights), from either form of the config."""
    if not cfg.sources:
        return [DEFAULT_SOURCE], [(0, None, {DEFAULT_SOURCE: 1.0})]
    names = [source.name for source in cfg.sources]
    if not cfg.mixture_schedule:
        return names, [(0, None, {source.name: source.weight for source in cfg.sources})]
    return names, [(phase.start_step, phase.start_tokens, phase.weights) for phase in cfg.mixture_schedule]


def read_sources(cfg: DataConfig) -> list[str]:
    """The sources some phase gives a weight above 0 (the others are never opened nor read)."""
    names, phases = source_weights(cfg)
    return [name for name in names if any(weights.get(name, 0.0) > 0 for _, _, weights in phases)]


@dataclass(frozen=True)
class Assignment:
    """Rows of a step: the source index of each, and its number among that source's crops."""

    source: np.ndarray
    crop: np.ndarray


class Mixture:
    """Row counts per source and step, the sources' positions, and the rows' sources (module docstring)."""

    def __init__(self, cfg: DataConfig, schedule: Schedule, seed: int, names: list[str]):
        self.schedule, self.seed, self.names = schedule, seed, names
        _, phases = source_weights(cfg)
        starts, weights = [], []
        for i, (start_step, start_tokens, phase_weights) in enumerate(phases):
            start = start_step if start_step is not None else schedule.first_step_at(start_tokens)
            if starts and start <= starts[-1]:
                raise DataPlanError(f"data.mixture_schedule[{i}] starts at step {start}, not after the phase before "
                                    f"(step {starts[-1]}); list phases in order")
            row = np.array([phase_weights.get(name, 0.0) for name in names], dtype=np.float64)
            weights.append(row / row.sum())
            starts.append(start)
        self.phase_starts = np.array(starts, dtype=np.int64)
        self.cumulative = np.cumsum(np.array(weights), axis=1)
        self.cumulative[:, -1] = 1.0  # exact, so the last boundary is R
        self.anchor(0, np.zeros(len(names), dtype=np.int64))

    # ---- per-step counts ----
    def weights_at(self, step: int) -> np.ndarray:
        """The sources' normalised weights at `step` (its phase's)."""
        phase = int(np.searchsorted(self.phase_starts, step, side="right")) - 1
        return np.diff(self.cumulative[phase], prepend=0.0)

    def boundaries(self, steps: np.ndarray, rows: int) -> np.ndarray:
        """(len(steps), K + 1) row boundaries b_0 = 0 .. b_K = rows of steps that all have `rows` rows."""
        steps = np.asarray(steps, dtype=np.int64)
        phase = np.searchsorted(self.phase_starts, steps, side="right") - 1
        u = uniform_float(derive_key(self.seed, TAG_MIX, steps))
        bounds = np.floor(rows * self.cumulative[phase] + u[:, None]).astype(np.int64)
        bounds[:, -1] = rows
        return np.concatenate([np.zeros((len(steps), 1), dtype=np.int64), bounds], axis=1)

    # ---- positions ----
    def anchor(self, step: int, tokens: np.ndarray) -> None:
        """Positions at `step` are `tokens` (a resumed run: what its checkpoint says); later ones follow."""
        self._anchor_step = step
        self._cache = {step: np.asarray(tokens, dtype=np.int64).copy()}  # anchor, then multiples of CACHE_EVERY
        self._highest = step

    def _advance(self, step: int, tokens: np.ndarray, to_step: int) -> np.ndarray:
        tokens = tokens.copy()
        while step < to_step:
            stage = self.schedule.stage_at(step)
            end = to_step if stage.end_step is None else min(to_step, stage.end_step)
            length = stage.seq_len
            tokens = -(-tokens // length) * length  # a stage starts on a whole crop of its length
            for first in range(step, end, BLOCK_STEPS):
                steps = np.arange(first, min(end, first + BLOCK_STEPS), dtype=np.int64)
                tokens += length * np.diff(self.boundaries(steps, stage.global_batch), axis=1).sum(axis=0)
            step = end
        length = self.schedule.stage_at(to_step).seq_len
        return -(-tokens // length) * length

    def positions(self, step: int) -> np.ndarray:
        """Each source's token position at the start of `step` (a multiple of the step's seq_len)."""
        if step < self._anchor_step:
            raise DataPlanError(f"step {step} precedes step {self._anchor_step}, where this stream was resumed; "
                                f"earlier steps followed the data plan of the run before")
        mark = max(self._anchor_step, step - step % CACHE_EVERY)
        while self._highest < mark:  # the cache runs without a gap from the anchor up to _highest
            following = self._highest - self._highest % CACHE_EVERY + CACHE_EVERY
            self._cache[following] = self._advance(self._highest, self._cache[self._highest], following)
            self._highest = following
        return self._advance(mark, self._cache[mark], step)

    # ---- rows ----
    def assign(self, step: int, rows: np.ndarray) -> Assignment:
        """Source and crop number of global rows `rows` of `step`."""
        stage = self.schedule.stage_at(step)
        bounds = self.boundaries(np.array([step]), stage.global_batch)[0]
        slot = feistel_permute(rows, stage.global_batch, int(derive_key(self.seed, TAG_ROWS, step)))
        source = np.searchsorted(bounds[1:], slot, side="right")
        first_crop = self.positions(step) // stage.seq_len
        return Assignment(source, first_crop[source] + slot - bounds[source])
