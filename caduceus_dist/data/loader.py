"""Training and evaluation streams: from a global cursor to masked, collated, pinned batches.

    stream = TrainStream(data_cfg, rank=r, world_size=W, grad_accum=G)
    stream.load_state_dict(saved)              # optional: exact (or elastic) resume
    for step_batch in stream.iterate():         # one StepBatch per optimizer step, in order
        for micro in step_batch.micro_batches:  # G dicts: input_ids, targets (B, L) int64, target_softmasked
            ...                                 # (B, L) bool; source, sample_id, crop_offset, strand, epoch (B,)
        saved = stream.state_dict()             # = step_batch.state: data consumed through this step

Step s has global rows 0..R-1 (R = the stage's global batch); data-parallel rank r takes rows
[r * G * B, (r + 1) * G * B) and micro-batch m the m-th B of those. With context parallelism each of the
cp ranks of a group takes its contiguous slice of those rows' positions (`SequenceSlice`). Which source
(genome) a row comes from and which of that source's crops it is: `mixture.py`; where that crop lies:
`cursor.py`. Everything (which crop, its strand, its
mask) is a function of (seed, step, row) and the crop's identity, so the global batch is the same at any
world size, resume is "set the step and the sources' positions", and batches that were prefetched but
never consumed are simply regenerated. DataLoader workers build whole micro-batches (no per-sample
Python work); the worker that builds an item does not influence its content.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from caduceus_dist.data.config import DataConfig
from caduceus_dist.data.curriculum import DataPlanError, Schedule, StepPlan
from caduceus_dist.data.cursor import TAG_MASK, TAG_STRAND, CropOrder, derive_key, uniform_float
from caduceus_dist.data.dataset import ShardSplit
from caduceus_dist.data.masking import MaskingPolicy, masked_crops
from caduceus_dist.data.mixture import DEFAULT_SOURCE, Mixture, read_sources, source_key
from caduceus_dist.data.transfer import converted, worker_loader
from caduceus_dist.shard_format import ShardFormatError

log = logging.getLogger(__name__)

STATE_VERSION = 2  # 1: caduceus-dist up to issue 11 (one source, grouped window order)
DEFAULT_SEED = 2222  # the reference's seed (docs/reference-recipe.md §5)


@dataclass(frozen=True)
class Rows:
    """Provenance of the rows of one batch: which bases, in which orientation, under which epoch key."""

    source: np.ndarray  # index into the stream's sources
    epoch: np.ndarray
    sample_id: np.ndarray
    offset: np.ndarray
    strand: np.ndarray  # 0 = as stored (+), 1 = reverse complement
    seq_len: int


@dataclass(frozen=True)
class SequenceSlice:
    """Rank `index` of the `count` ranks of a context-parallel group: positions [index L/count, (index+1) L/count)
    of every sequence. The whole crop is built (and masked) first, so the masks do not depend on `count`."""

    index: int = 0
    count: int = 1

    def check(self, seq_len: int, what: str) -> None:
        if seq_len % self.count:
            raise DataPlanError(f"{what} = {seq_len} is not divisible by engine.cp={self.count}: each rank of a "
                                f"context-parallel group takes an equal slice of every sequence; use a multiple of "
                                f"{self.count} (or a smaller engine.cp)")

    def apply(self, batch: dict) -> dict:
        if self.count > 1:
            for key in ("input_ids", "targets"):
                width = batch[key].shape[1] // self.count
                batch[key] = np.ascontiguousarray(batch[key][:, self.index * width:(self.index + 1) * width])
        return batch


def crop_keys(seed: int, tag: int, source_keys: np.ndarray, rows: Rows) -> np.ndarray:
    return derive_key(seed, tag, source_keys[rows.source], rows.epoch, rows.sample_id, rows.offset, rows.seq_len)


def _references(items: list, index: int) -> int:
    """sys.getrefcount of items[index], always read by this same code (so borrowed loads count alike)."""
    return sys.getrefcount(items[index])


class _OutputBuffers:
    """The builder's (2, B, L) output arrays, reused once nothing outside holds them.

    Writing a fresh 2 MiB batch costs a page fault per 4 KiB page, about as long as the masking
    itself; a DataLoader worker pickles each batch into its pipe and drops it, so one buffer serves
    batch after batch. A buffer still referenced anywhere (a queued or kept batch, a view of it) is
    never handed out again: its reference count is above that of an object only a list holds.
    """

    def __init__(self, keep: int = 2):
        self.keep, self._buffers = keep, []
        self._only_listed = _references([object()], 0)

    def __getstate__(self):  # buffers belong to the process that filled them
        return {**self.__dict__, "_buffers": []}

    def get(self, rows: int, length: int) -> np.ndarray:
        for index in range(len(self._buffers)):
            if self._buffers[index].shape == (2, rows, length) and _references(self._buffers, index) <= self._only_listed:
                return self._buffers[index]
        buffer = np.empty((2, rows, length), dtype=np.uint8)
        self._buffers = [*self._buffers[-(self.keep - 1):], buffer] if self.keep > 1 else [buffer]
        return buffer


class _BatchBuilder:
    """Reads and masks the rows of a batch; shared by the training and evaluation streams.

    Returns compact numpy arrays (uint8 tokens): that is what crosses the worker -> trainer pipe,
    8x less than int64 and without one shared-memory segment per tensor. `to_torch` (in the
    consuming process) widens to int64 and pins. Memory per worker: the (B, L) stored crops and two
    (2, B, L) output buffers, 5 bytes per token of a micro-batch.
    """

    def __init__(self, splits: list[ShardSplit], source_keys: np.ndarray, seed: int, policy: MaskingPolicy):
        self.splits, self.source_keys, self.seed, self.policy = splits, source_keys, seed, policy
        self.masker: str | None = None  # masking backend (masking.MASKERS); None: native where it compiled
        self._outputs = _OutputBuffers()
        self._stored: np.ndarray | None = None

    def __getstate__(self):
        return {**self.__dict__, "_stored": None}

    def read(self, rows: Rows) -> np.ndarray:
        """The rows' crops as stored, (B, L) uint8 (valid until the next call)."""
        shape = (len(rows.sample_id), rows.seq_len)
        if self._stored is None or self._stored.shape != shape:
            self._stored = np.empty(shape, dtype=np.uint8)
        for source in np.unique(rows.source).tolist():
            mine = np.flatnonzero(rows.source == source)
            if len(mine) == shape[0]:
                self.splits[source].read_crops(rows.sample_id, rows.offset, self._stored)
            else:
                part = np.empty((len(mine), shape[1]), dtype=np.uint8)
                self.splits[source].read_crops(rows.sample_id[mine], rows.offset[mine], part)
                self._stored[mine] = part
        return self._stored

    def build(self, rows: Rows) -> dict:
        inputs, targets = masked_crops(self.read(rows), rows.strand, crop_keys(self.seed, TAG_MASK, self.source_keys, rows),
                                       self.policy, self.masker, out=self._outputs.get(len(rows.sample_id), rows.seq_len))
        return {"input_ids": inputs, "targets": targets, "source": rows.source, "sample_id": rows.sample_id,
                "crop_offset": rows.offset, "strand": rows.strand, "epoch": rows.epoch}


def resolve_seed(cfg: DataConfig, train_seed: int | None = None) -> int:
    if cfg.seed is not None:
        return cfg.seed
    return DEFAULT_SEED if train_seed is None else train_seed


def masking_policy(cfg: DataConfig) -> MaskingPolicy:
    return MaskingPolicy(cfg.mlm_probability, cfg.mask_fraction, cfg.random_fraction)


def source_roots(cfg: DataConfig) -> dict[str, str]:
    """Source name -> shard root, for both forms of the config (`data.shards` is the source 'default')."""
    if not cfg.sources:
        return {DEFAULT_SOURCE: cfg.shards}
    return {source.name: source.shards for source in cfg.sources}


def open_split(cfg: DataConfig, split: str, source: str = DEFAULT_SOURCE) -> ShardSplit:
    """One source's split; a source whose shards are missing or unreadable is named in the error."""
    root = source_roots(cfg)[source]
    try:
        return ShardSplit(root, split, verify=cfg.verify, on_corrupt=cfg.on_corrupt, use_stamps=cfg.verify_cache)
    except ShardFormatError as err:
        if source == DEFAULT_SOURCE:
            raise
        raise ShardFormatError(f"data.sources '{source}': {err}") from None


@dataclass
class StepBatch:
    step: int
    plan: StepPlan
    micro_batches: list[dict]
    state: dict  # the stream's state_dict once this step is consumed


class _TrainItems(Dataset):
    """Map-style view: key (step, micro) -> that rank's micro-batch; pickled into each worker."""

    def __init__(self, stream: TrainStream):
        self.stream = stream

    def __getitem__(self, key: tuple[int, int]) -> dict:
        step, micro = key
        batch = self.stream.cp_slice.apply(self.stream._builder.build(self.stream.rows(step, self.stream.rank, micro)))
        batch["step"], batch["micro"] = step, micro
        return batch

    def __len__(self) -> int:  # unbounded stream; the sampler decides what is read
        raise TypeError("the training stream is unbounded")


class _StepSampler:
    def __init__(self, start: int, stop: int | None, grad_accum: int):
        self.start, self.stop, self.grad_accum = start, stop, grad_accum

    def __iter__(self):
        steps = itertools.count(self.start) if self.stop is None else range(self.start, self.stop)
        for step in steps:
            for micro in range(self.grad_accum):
                yield step, micro


class TrainStream:
    """The training data of one data-parallel rank; see the module docstring."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 train_seed: int | None = None, windows: dict[str, tuple[np.ndarray, int]] | None = None,
                 cp_slice: SequenceSlice = SequenceSlice()):
        """rank, world_size: this rank among the data-parallel ranks; cp_slice: its share of each sequence."""
        cfg.validate()
        if not 0 <= rank < world_size:
            raise DataPlanError(f"rank {rank} is not in [0, world_size {world_size})")
        self.cfg, self.rank, self.world_size, self.grad_accum = cfg, rank, world_size, grad_accum
        self.cp_slice = cp_slice
        self.seed = resolve_seed(cfg, train_seed)
        self.names = read_sources(cfg) if windows is None else list(windows)
        self.splits: list[ShardSplit] = []  # none for a planned stream
        if windows is None:
            self.splits = [open_split(cfg, cfg.split, name) for name in self.names]
            windows = {name: (split.sample_ids, split.window) for name, split in zip(self.names, self.splits, strict=True)}
        self.skipped_shards = [skipped for split in self.splits for skipped in split.skipped]
        self.schedule = Schedule(cfg, world_size, grad_accum, {name: window for name, (_, window) in windows.items()})
        for stage in self.schedule.stages:
            cp_slice.check(stage.seq_len, f"data.seq_len (curriculum stage {stage.index})")
        self.mixture = Mixture(cfg, self.schedule, self.seed, self.names)
        self.source_keys = np.array([source_key(name) for name in self.names], dtype=np.uint64)
        self.orders = [CropOrder(windows[name][0], windows[name][1], self.seed, source_key(name)) for name in self.names]
        self._builder = _BatchBuilder(self.splits, self.source_keys, self.seed, masking_policy(cfg))
        self._next_step = 0
        self._tokens_anchor = (0, 0)  # (step, global tokens consumed before it)

    @classmethod
    def planned(cls, cfg: DataConfig, windows: dict[str, tuple[int, int]], world_size: int = 1, grad_accum: int = 1,
                train_seed: int | None = None) -> TrainStream:
        """The plan of a stream over splits that need not exist: source name -> (windows, window length).
        Rows, positions and state are those of real shards with that many windows; nothing can be read."""
        return cls(cfg, 0, world_size, grad_accum, train_seed,
                   {name: (np.arange(count, dtype=np.int64), window) for name, (count, window) in windows.items()})

    # ---- the plan: pure functions of the step ----
    def plan(self, step: int) -> StepPlan:
        return self.schedule.plan(step)

    def tokens_before(self, step: int) -> int:
        """Global tokens consumed before `step` (all sources, all epochs)."""
        anchor_step, anchor_tokens = self._tokens_anchor
        return anchor_tokens + self.schedule.tokens_before(step) - self.schedule.tokens_before(anchor_step)

    def rows(self, step: int, rank: int, micro: int) -> Rows:
        """The rows that `rank` receives in micro-batch `micro` of `step` (any rank: used by the plan CLI)."""
        plan = self.plan(step)
        first = (rank * self.grad_accum + micro) * plan.micro_batch
        assigned = self.mixture.assign(step, first + np.arange(plan.micro_batch, dtype=np.int64))
        epoch, sample_id, offset = (np.empty(plan.micro_batch, dtype=np.int64) for _ in range(3))
        for source in np.unique(assigned.source).tolist():
            mine = np.flatnonzero(assigned.source == source)
            located = self.orders[source].locate(assigned.crop[mine], plan.seq_len)
            epoch[mine], sample_id[mine], offset[mine] = located.epoch, located.sample_id, located.offset
        strand_keys = derive_key(self.seed, TAG_STRAND, self.source_keys[assigned.source], epoch, sample_id, offset,
                                 plan.seq_len)
        strand = (uniform_float(strand_keys) < self.cfg.rc_probability).astype(np.int64)
        return Rows(assigned.source, epoch, sample_id, offset, strand, plan.seq_len)

    # ---- iteration ----
    def iterate(self, start_step: int | None = None, stop_step: int | None = None) -> Iterator[StepBatch]:
        """StepBatches from `start_step` (default: where the state says) to `stop_step` (exclusive; None = forever)."""
        start = self._next_step if start_step is None else start_step
        loader = worker_loader(_TrainItems(self), _StepSampler(start, stop_step, self.grad_accum), self.cfg,
                               self.cfg.num_workers, self._private_generator())
        micro_batches: list[dict] = []
        batches = converted(loader, self.cfg, depth=2 * self.grad_accum)
        try:
            for batch in batches:
                micro_batches.append(batch)
                if len(micro_batches) == self.grad_accum:
                    step = batch["step"]
                    self._next_step = step + 1
                    yield StepBatch(step, self.plan(step), micro_batches, self.state_dict())
                    micro_batches = []
        finally:  # closing this generator stops the workers now, not whenever it is collected
            batches.close()

    def _private_generator(self) -> torch.Generator:
        """DataLoader draws its worker base seed from this, never from the global torch RNG (whose state
        the checkpoint restores: drawing from it would shift a resumed run by one draw). Batches do not
        depend on it: all their randomness is keyed by the data cursor."""
        return torch.Generator().manual_seed(self.seed)

    # ---- state ----
    def state_dict(self) -> dict:
        step = self._next_step
        positions = self.mixture.positions(step)
        return {
            "version": STATE_VERSION, "seed": self.seed, "step": step, "tokens": self.tokens_before(step),
            "stage": self.schedule.stage_at(step).index,
            "sources": {name: {"tokens": int(tokens), "epochs": float(tokens / order.epoch_tokens),
                               "windows": order.windows, "window": order.window}
                        for name, tokens, order in zip(self.names, positions.tolist(), self.orders, strict=True)},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue after `state` (saved at any world size): the same global sequence of crops."""
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise DataPlanError(f"data state: key 'version' is {version!r}, expected {STATE_VERSION}")
        if state["seed"] != self.seed:
            raise DataPlanError(f"data state: key 'seed' is {state['seed']} but this run uses seed {self.seed} "
                                f"(data.seed / train.seed); the data order would change mid-run")
        step = int(state["step"])
        saved = _saved_sources(state, self.names)
        positions = np.zeros(len(self.names), dtype=np.int64)
        for i, (name, order) in enumerate(zip(self.names, self.orders, strict=True)):
            if name not in saved:
                log.warning("data: source '%s' is new since the checkpoint; it starts at its beginning", name)
                continue
            changed = {k: (saved[name][k], now) for k, now in (("windows", order.windows), ("window", order.window))
                       if saved[name][k] != now}
            if changed:
                raise DataPlanError(f"data state: source '{name}' changed since the checkpoint: (saved, now) = "
                                    f"{changed}; resuming would repeat or skip data. Restore its original shards")
            positions[i] = int(saved[name]["tokens"])
        for name in sorted(set(saved) - set(self.names)):
            log.warning("data: source '%s' of the checkpoint is no longer read (removed, or weight 0 throughout)", name)
        self.mixture.anchor(step, positions)
        self._tokens_anchor = (step, int(state["tokens"]))
        self._next_step = step


def _saved_sources(state: dict, names: list[str]) -> dict[str, dict]:
    """Per-source positions of a saved state. Version 1 (one source, the grouped window order this release
    replaced) continues as the one source from the same token position, with a warning."""
    if state["version"] >= 2:
        return state["sources"]
    log.warning("data: this checkpoint's data order (grouped windows, before the crop shuffle of docs/loading.md) "
                "is not produced any more; continuing from the same token position in the new order, so the rest "
                "of its current epoch may repeat or leave out some windows")
    return {names[0]: {"tokens": state["tokens"], "windows": state["order"]["windows"], "window": state["order"]["window"]}}


def _split_epoch(split: str) -> int:
    """A fixed pseudo-epoch per evaluation split, outside the range of training epochs."""
    return (1 << 40) + int.from_bytes(hashlib.blake2s(split.encode(), digest_size=4).digest(), "little")


class _EvalItems(Dataset):
    def __init__(self, builder: _BatchBuilder, rows_of, cp_slice: SequenceSlice):
        self.builder, self.rows_of, self.cp_slice = builder, rows_of, cp_slice

    def __getitem__(self, index: int) -> dict:
        return self.cp_slice.apply(self.builder.build(self.rows_of(index)))


class EvalStream:
    """A fixed evaluation stream of one source: crops in sample-id order, fixed masks, no RC; the same at
    any world size.

    Global batch t holds crops [t * B, (t + 1) * B) of the split (the last one may be short); rank r
    gets a contiguous slice (sizes differ by at most one; a rank may get an empty (0, L) batch).
    Re-iterable: every pass yields the same batches.
    """

    def __init__(self, cfg: DataConfig, split: str, rank: int, world_size: int, max_batches: int | None = None,
                 train_seed: int | None = None, source: str = DEFAULT_SOURCE, cp_slice: SequenceSlice = SequenceSlice()):
        cfg.validate()
        self.cfg, self.rank, self.world_size, self.source, self.cp_slice = cfg, rank, world_size, source, cp_slice
        self.split = open_split(cfg, split, source)
        self.seq_len = cfg.eval_seq_len or cfg.seq_len
        cp_slice.check(self.seq_len, "the evaluation length (data.eval_seq_len or data.seq_len)")
        if self.split.window % self.seq_len:
            raise DataPlanError(f"eval seq_len {self.seq_len} does not divide the stored window length "
                                f"{self.split.window} (manifest 'window' of {self.split.root})")
        self.batch_size = cfg.eval_batch_size or max(1, cfg.tokens_per_step // self.seq_len)
        self.crops_per_window = self.split.window // self.seq_len
        self.crops = len(self.split.sample_ids) * self.crops_per_window
        batches = -(-self.crops // self.batch_size)
        self.batches = batches if max_batches is None else min(batches, max_batches)
        self._epoch = _split_epoch(split)
        self._builder = _BatchBuilder([self.split], np.array([source_key(source)], dtype=np.uint64),
                                      resolve_seed(cfg, train_seed), masking_policy(cfg))

    def rows(self, index: int, rank: int | None = None) -> Rows:
        rank = self.rank if rank is None else rank
        first = index * self.batch_size
        size = min(self.batch_size, self.crops - first)
        lo, hi = (first + size * r // self.world_size for r in (rank, rank + 1))
        crop = np.arange(lo, hi, dtype=np.int64)
        window, piece = np.divmod(crop, self.crops_per_window)
        zeros = np.zeros(len(crop), dtype=np.int64)
        return Rows(zeros, np.full(len(crop), self._epoch, dtype=np.int64), self.split.sample_ids[window],
                    piece * self.seq_len, zeros, self.seq_len)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        loader = worker_loader(_EvalItems(self._builder, self.rows, self.cp_slice), range(self.batches), self.cfg,
                               min(self.cfg.num_workers, self.batches), torch.Generator().manual_seed(0))
        return converted(loader, self.cfg, depth=2)


def build_eval_loader(cfg: DataConfig, split: str = "valid", rank: int = 0, world_size: int = 1,
                      max_batches: int | None = None, train_seed: int | None = None,
                      source: str = DEFAULT_SOURCE, cp_slice: SequenceSlice = SequenceSlice()) -> EvalStream:
    """The fixed validation/test stream of `split` of one source for one data-parallel rank (see EvalStream)."""
    return EvalStream(cfg, split, rank, world_size, max_batches, train_seed, source, cp_slice)
