"""The sequence-length schedule: which stage, length and batch each optimizer step uses.

A stage is (seq_len, global_batch, first step, last step). Where in each genome a step's rows come
from is the mixture's business (`mixture.py`); the schedule says how many rows of which length.
All checks that need numbers from several places (tokens per step, world size, gradient
accumulation, the stored windows) are made here, before the first step, and name the numbers.
"""

from __future__ import annotations

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
    start_tokens: int  # tokens consumed before start_step (from step 0)


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step consumes."""

    step: int
    stage: int
    seq_len: int
    global_batch: int
    micro_batch: int  # sequences per micro-batch per rank
    grad_accum: int
    world_size: int
    tokens_per_step: int


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
    """Stages with their batch sizes, validated for a world size, gradient accumulation and the stored windows."""

    def __init__(self, cfg: DataConfig, world_size: int, grad_accum: int, windows: dict[str, int]):
        if world_size < 1 or grad_accum < 1:
            raise DataPlanError(f"world_size {world_size} and grad_accum {grad_accum} must be >= 1")
        self.world_size, self.grad_accum = world_size, grad_accum
        lengths = _stage_lengths(cfg)
        for length, _, _ in lengths:
            for name, window in windows.items():
                if window % length:
                    where = "" if len(windows) == 1 else f" of source '{name}'"
                    raise DataPlanError(f"seq_len {length} does not divide the stored window length {window}{where} "
                                        f"(manifest 'window'): every base must be used, so pick a divisor or reshard "
                                        f"with --window a multiple of {length}")
        hold_batch = cfg.curriculum.enabled and cfg.curriculum.hold == "batch"
        ranks_x_micro = world_size * grad_accum
        self.stages: list[Stage] = []
        step = tokens = 0
        for index, (length, steps, stage_tokens) in enumerate(lengths):
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
            if stage_tokens is not None:
                step_tokens = global_batch * length
                if stage_tokens % step_tokens:
                    raise DataPlanError(f"curriculum stage {index}: tokens {stage_tokens} is not a whole number of "
                                        f"steps of {step_tokens} tokens")
                steps = stage_tokens // step_tokens
            end = None if steps is None else step + steps
            self.stages.append(Stage(index, length, global_batch, step, end, tokens))
            if end is None:
                break
            tokens += steps * global_batch * length
            step = end

    def stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if stage.end_step is None or step < stage.end_step:
                return stage
        return self.stages[-1]

    def tokens_before(self, step: int) -> int:
        """Tokens all steps before `step` consume (this schedule, from step 0)."""
        stage = self.stage_at(step)
        return stage.start_tokens + (step - stage.start_step) * stage.global_batch * stage.seq_len

    def first_step_at(self, tokens: int) -> int:
        """The first step at or past `tokens` consumed tokens."""
        for stage in self.stages:
            per_step = stage.global_batch * stage.seq_len
            if stage.end_step is None or tokens <= self.tokens_before(stage.end_step):
                return stage.start_step + max(0, -(-(tokens - stage.start_tokens) // per_step))
        raise AssertionError("unreachable: the last stage is open-ended")

    def plan(self, step: int) -> StepPlan:
        stage = self.stage_at(step)
        return StepPlan(step=step, stage=stage.index, seq_len=stage.seq_len, global_batch=stage.global_batch,
                        micro_batch=stage.global_batch // (self.world_size * self.grad_accum),
                        grad_accum=self.grad_accum, world_size=self.world_size,
                        tokens_per_step=stage.global_batch * stage.seq_len)
