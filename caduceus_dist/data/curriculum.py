"""The sequence-length schedule: which stage, length and batch each optimizer step uses.

A stage is (seq_len, global_batch, first step, last step). The schedule also turns a step into a
position in the data stream, counted in units of `unit` tokens (the shortest stage length), which
is what makes a stage change mid-epoch exact: step s consumes units [P(s), P(s+1)).
All checks that need numbers from several places (tokens per step, world size, gradient
accumulation, the stored window) are made here, before the first step, and name the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from caduceus_dist.data.config import DataConfig


class DataPlanError(ValueError):
    """The data settings cannot be satisfied at this world size / with these shards; names the numbers."""


@dataclass(frozen=True)
class Stage:
    index: int
    seq_len: int
    global_batch: int  # sequences per optimizer step, all ranks and micro-batches together
    start_step: int
    end_step: int | None  # exclusive; None = open-ended
    start_unit: int  # units consumed before start_step (natural schedule, from step 0)


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step consumes; `position` is the global unit cursor at its start."""

    step: int
    stage: int
    seq_len: int
    global_batch: int
    micro_batch: int  # sequences per micro-batch per rank
    grad_accum: int
    world_size: int
    tokens_per_step: int
    position: int
    unit: int

    @property
    def units_per_row(self) -> int:
        return self.seq_len // self.unit


def _stage_lengths(cfg: DataConfig) -> list[tuple[int, int | None, int | None]]:
    """(seq_len, duration steps, duration tokens) per stage, before batch sizes are known."""
    cur = cfg.curriculum
    if cur.stages:
        return [(s.seq_len, s.steps, s.tokens) for s in cur.stages]
    if cur.start_seq_len is not None:
        lengths, length = [], cur.start_seq_len
        while length < cfg.seq_len:
            lengths.append((length, cur.stage_steps, None))
            length *= cur.growth
        if length != cfg.seq_len:
            raise DataPlanError(f"data.curriculum: start_seq_len {cur.start_seq_len} times powers of growth "
                                f"{cur.growth} never reaches data.seq_len {cfg.seq_len}")
        return [*lengths, (cfg.seq_len, None, None)]
    return [(cfg.seq_len, None, None)]


class Schedule:
    """Stages with their batch sizes, validated for a world size and gradient accumulation."""

    def __init__(self, cfg: DataConfig, world_size: int, grad_accum: int, window: int):
        if world_size < 1 or grad_accum < 1:
            raise DataPlanError(f"world_size {world_size} and grad_accum {grad_accum} must be >= 1")
        self.world_size, self.grad_accum = world_size, grad_accum
        lengths = _stage_lengths(cfg)
        seq_lens = [length for length, _, _ in lengths]
        self.unit = math.gcd(*seq_lens)
        self.slab = max(seq_lens)
        for length in seq_lens:
            if window % length:
                raise DataPlanError(f"seq_len {length} does not divide the stored window length {window} "
                                    f"(manifest 'window'): every base must be used, so pick a divisor or reshard "
                                    f"with --window a multiple of {length}")
            if self.slab % length:
                raise DataPlanError(f"curriculum seq_len {length} does not divide the longest stage length {self.slab}")
        hold_batch = cfg.curriculum.enabled and cfg.curriculum.hold == "batch"
        ranks_x_micro = world_size * grad_accum
        self.stages: list[Stage] = []
        step = unit = 0
        for index, (length, steps, tokens) in enumerate(lengths):
            if hold_batch:
                global_batch = cfg.curriculum.global_batch
            else:
                if cfg.tokens_per_step % length:
                    raise DataPlanError(f"data.tokens_per_step {cfg.tokens_per_step} is not divisible by seq_len "
                                        f"{length} (stage {index})")
                global_batch = cfg.tokens_per_step // length
            if global_batch % ranks_x_micro:
                raise DataPlanError(
                    f"stage {index}: global batch {global_batch} sequences (tokens_per_step {cfg.tokens_per_step} / "
                    f"seq_len {length}) is not divisible by world_size {world_size} x grad_accum {grad_accum} = "
                    f"{ranks_x_micro}; tokens_per_step must be a multiple of seq_len x world_size x grad_accum = "
                    f"{length * ranks_x_micro}")
            if tokens is not None:
                step_tokens = global_batch * length
                if tokens % step_tokens:
                    raise DataPlanError(f"curriculum stage {index}: tokens {tokens} is not a whole number of steps "
                                        f"of {step_tokens} tokens")
                steps = tokens // step_tokens
            end = None if steps is None else step + steps
            if unit % (length // self.unit):
                raise DataPlanError(f"curriculum stage {index} (seq_len {length}) starts at data position {unit * self.unit} "
                                    f"tokens, not a multiple of {length}; use an even global_batch")
            self.stages.append(Stage(index, length, global_batch, step, end, unit))
            if end is None:
                break
            unit += steps * global_batch * (length // self.unit)
            step = end

    def stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if stage.end_step is None or step < stage.end_step:
                return stage
        return self.stages[-1]

    def natural_position(self, step: int) -> int:
        """Units consumed before `step` when training ran this schedule from step 0."""
        stage = self.stage_at(step)
        return stage.start_unit + (step - stage.start_step) * stage.global_batch * (stage.seq_len // self.unit)

    def advance(self, step: int, position: int, to_step: int) -> int:
        """The unit position at the start of `to_step`, continuing from `position` at the start of `step`.

        Every stage starts at a multiple of its row length. From step 0 that holds by construction (the
        constructor refuses other schedules); a stream resumed with another batch size may reach a stage
        boundary mid-row, and then skips to the next row start (less than one row of data).
        """
        while True:
            stage = self.stage_at(step)
            row = stage.seq_len // self.unit
            position = -(-position // row) * row
            if stage.end_step is None or to_step < stage.end_step:
                return position + (to_step - step) * stage.global_batch * row
            position += (stage.end_step - step) * stage.global_batch * row
            step = stage.end_step

    def plan(self, step: int, position: int) -> StepPlan:
        stage = self.stage_at(step)
        return StepPlan(step=step, stage=stage.index, seq_len=stage.seq_len, global_batch=stage.global_batch,
                        micro_batch=stage.global_batch // (self.world_size * self.grad_accum),
                        grad_accum=self.grad_accum, world_size=self.world_size,
                        tokens_per_step=stage.global_batch * stage.seq_len, position=position, unit=self.unit)
