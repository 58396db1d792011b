"""The `train:` keys of a job."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    """`eval_every` 0 = every max_steps/5 steps, as the reference; `eval_batches` per validation
    (the same global batches at any world size); `deterministic` turns on torch's deterministic
    algorithms (bitwise-reproducible CPU runs, at some speed cost). `init_from`: the weights a new run
    starts from (a Hugging Face directory as `python -m caduceus_dist.export` writes or the hub serves, or a
    safetensors / Lightning .ckpt file), e.g. a 131k model continued at 2^20 bases (context extension);
    the optimizer, schedule and data start fresh, and a run that resumes from its own checkpoint ignores it."""

    max_steps: int = 1000
    seed: int = 2222
    grad_accum: int = 1
    eval_every: int = 0
    eval_batches: int = 8
    eval_split: str = "valid"
    deterministic: bool = False
    init_from: str | None = None
