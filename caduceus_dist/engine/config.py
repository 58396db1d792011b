"""EngineConfig: which parallelism wrapper trains the model, and at what precision."""

from __future__ import annotations

from dataclasses import dataclass

PRECISION_NAMES = ("fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineConfig:
    """How the model is wrapped for training. `name` picks an entry of `caduceus_dist.engine.ENGINES`.

    - deepspeed: ZeRO stage `zero_stage` (0-3); the DeepSpeed JSON is generated from this config,
      `optimizer` and `train`; `deepspeed_config` names a user JSON merged on top of it.
    - fsdp2: `fully_shard` per Caduceus layer, then the root; bf16 uses a MixedPrecisionPolicy
      (bf16 compute, fp32 gradient reduction, fp32 master weights).
    - ddp: one process, or DistributedDataParallel when launched with several ranks.

    `cp` (context parallelism, fsdp2 and ddp): each sequence is split over `cp` consecutive ranks, so the
    world is (world / cp) data-parallel replicas x cp; docs/context-parallel.md.
    """

    name: str = "ddp"
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    zero_stage: int = 2
    deepspeed_config: str | None = None
    fsdp_reshard_after_forward: bool = True
    compile: bool = False  # torch.compile each Caduceus layer
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    cp: int = 1  # context-parallel degree: ranks that share each sequence
