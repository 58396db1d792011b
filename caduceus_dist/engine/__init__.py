"""Parallelism wrappers behind one Engine protocol; `ENGINES` maps `engine.name` to the class.

Engine classes are imported lazily so a DDP run never imports DeepSpeed.
"""

from __future__ import annotations

import importlib

from caduceus_dist.engine.base import DistContext, Engine, init_distributed
from caduceus_dist.engine.config import EngineConfig

ENGINES = {
    "deepspeed": "caduceus_dist.engine.deepspeed_engine:DeepSpeedEngine",
    "fsdp2": "caduceus_dist.engine.fsdp2:FSDP2Engine",
    "ddp": "caduceus_dist.engine.ddp:DDPEngine",
}


def build_engine(job_cfg, model, ctx: DistContext, micro_batch: int = 1) -> Engine:
    """Wrap `model` with the engine named by `job_cfg.engine.name` (validated at config load).

    `micro_batch` only sizes DeepSpeed's batch bookkeeping; offline use (export) can leave it at 1.
    """
    module_name, class_name = ENGINES[job_cfg.engine.name].split(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    return engine_cls(job_cfg, model, ctx, micro_batch)


__all__ = ["ENGINES", "DistContext", "Engine", "EngineConfig", "build_engine", "init_distributed"]
