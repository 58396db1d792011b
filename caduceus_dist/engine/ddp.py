"""Plain PyTorch: one process, or DistributedDataParallel over several (the simplest baseline)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from caduceus_dist.distributed import DistContext
from caduceus_dist.engine.base import TrainStepMixin, autocast, fp32_cpu
from caduceus_dist.loss import MaskedLMLoss
from caduceus_dist.optim.adamw import build_optimizer

STATE_FILE = "model_optim.pt"


class DDPEngine(TrainStepMixin):
    """fp32, bf16 autocast, or fp16 autocast with a dynamic GradScaler; full copies on every rank."""

    name = "ddp"

    def __init__(self, job_cfg, model: torch.nn.Module, ctx: DistContext, micro_batch: int, loss: MaskedLMLoss):
        self._adopt(job_cfg, model, ctx, loss)
        self.wrapped = (
            DistributedDataParallel(self.module, device_ids=[ctx.local_rank] if self.device.type == "cuda" else None)
            if self.world_size > 1
            else self.module
        )
        self.optimizer = build_optimizer(self.module, job_cfg.optim)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.cfg.precision == "fp16")

    def _accumulation_context(self, last: bool):
        if last or self.world_size == 1:
            return contextlib.nullcontext()
        return self.wrapped.no_sync()  # reduce gradients once, on the last micro-batch

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.cfg.precision):
            return self.wrapped(ids)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        self.scaler.scale(loss).backward()

    def _optimizer_step(self) -> torch.Tensor:
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save_checkpoint(self, path: Path) -> None:
        if self.rank == 0:
            state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict()}
            torch.save(state, Path(path) / STATE_FILE)

    def load_checkpoint(self, path: Path, saved_world_size: int) -> None:
        # Full replicas: the file is the same whatever the number of ranks that wrote or reads it.
        state = torch.load(Path(path) / STATE_FILE, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: fp32_cpu(v) for k, v in self.module.state_dict().items()}
