"""Parallelism wrappers behind one Engine protocol; `ENGINES` maps `engine.name` to the class.

Engine classes are imported only when built, so a DDP run never imports DeepSpeed and reading a config
imports no torch.
"""

from __future__ import annotations

import importlib

from caduceus_dist.lazy import lazy_exports

ENGINES = {
    "deepspeed": "caduceus_dist.engine.deepspeed_engine:DeepSpeedEngine",
    "fsdp2": "caduceus_dist.engine.fsdp2:FSDP2Engine",
    "ddp": "caduceus_dist.engine.ddp:DDPEngine",
}


def build_engine(job_cfg, model, ctx, micro_batch: int = 1, loss=None):
    """Wrap `model` with the engine named by `job_cfg.engine.name` (validated at config load).

    `micro_batch` only sizes DeepSpeed's batch bookkeeping; offline use (export) can leave it at 1.
    `loss` is the objective the step calls (default: the reference masked-LM loss).
    """
    from caduceus_dist.loss import MaskedLMLoss

    module_name, class_name = ENGINES[job_cfg.engine.name].split(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    return engine_cls(job_cfg, model, ctx, micro_batch, loss if loss is not None else MaskedLMLoss())


_EXPORTS = {"Engine": "base", "EngineConfig": "config"}
__all__ = ["ENGINES", "build_engine", *sorted(_EXPORTS)]

__getattr__ = lazy_exports(__name__, _EXPORTS)
