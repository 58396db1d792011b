"""FSDP2: `fully_shard` per model block, then the root; checkpoints with torch.distributed.checkpoint.

DCP stores each tensor with its global shape, so a checkpoint written by N ranks loads on M ranks
(resharding happens inside `dcp.load`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from caduceus_dist.distributed import DistContext
from caduceus_dist.engine.base import DCP_DIR, PRECISIONS, TrainStepMixin, fp32_cpu
from caduceus_dist.loss import MaskedLMLoss
from caduceus_dist.optim.adamw import build_optimizer, group_names


class FSDP2Engine(TrainStepMixin):
    name = "fsdp2"

    def __init__(self, job_cfg, model: torch.nn.Module, ctx: DistContext, micro_batch: int, loss: MaskedLMLoss):
        self._adopt(job_cfg, model, ctx, loss)
        groups = group_names(self.module, job_cfg.optim.weight_decay)  # before sharding drops the no-decay marks
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=PRECISIONS[self.cfg.precision], reduce_dtype=torch.float32)
        reshard = self.cfg.fsdp_reshard_after_forward
        for block in self.module.blocks():
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        fully_shard(self.module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        self.optimizer = build_optimizer(self.module, job_cfg.optim, groups)

    def _accumulation_context(self, last: bool):
        # Skip the reduce-scatter on all but the last micro-batch: gradients accumulate unsharded.
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.module(ids)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        loss.backward()

    def _optimizer_step(self) -> torch.Tensor:
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save_checkpoint(self, path: Path) -> None:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(path) / DCP_DIR))

    def load_checkpoint(self, path: Path, saved_world_size: int) -> None:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: fp32_cpu(v) for k, v in get_model_state_dict(self.module, options=options).items()}
