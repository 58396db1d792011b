"""The Engine protocol every parallelism wrapper implements, and the step logic they share.

Loss normalisation (why `train_step` looks the way it does): the loss of an optimizer step is the
mean over every scored target of the *global* batch. Each rank counts its targets (the loss component
says which positions count), one all-reduce gives the global count N, and every micro-batch
back-propagates `sum_of_its_losses * world / N`. Data-parallel wrappers average gradients over ranks,
so the update is exactly the gradient of the global mean whatever the split into ranks and
micro-batches (1 rank x 2 micro-batches equals 2 ranks x 1 micro-batch; docs/resume.md §3).

No host syncs in the step: the target count is reduced on the device and the scale stays a device
tensor; loss, hits and gradient norm come back as device tensors (`StepResult`), which the trainer
reduces and reads only on the steps it reports (docs/training.md, "What a step costs").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from caduceus_dist.distributed import DistContext, all_reduce_tensor
from caduceus_dist.engine.context_parallel import ChannelAllToAll, apply_context_parallel
from caduceus_dist.loss import MaskedLMLoss
from caduceus_dist.optim.adamw import set_lr

DCP_DIR = "dcp"  # where the DDP and FSDP2 engines keep their torch.distributed.checkpoint files
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # engine.config.PRECISION_NAMES


@dataclass
class StepResult:
    """One optimizer step's figures, still on the device (float64 0-d tensors)."""

    loss_sum: torch.Tensor  # this rank's summed loss
    n_correct: torch.Tensor  # this rank's correct predictions among its targets
    n_targets: torch.Tensor  # the global batch's target count (already reduced)
    grad_norm: torch.Tensor  # the global gradient norm

    def reduce(self) -> dict[str, float]:
        """Collective, and a host sync: the global figures. Float64 sums keep the loss what it was when
        every micro-batch's sum was read on the host (bitwise)."""
        local = all_reduce_tensor(torch.stack([self.loss_sum, self.n_correct]))
        loss_sum, n_correct, n_targets, grad_norm = torch.cat([local, torch.stack(
            [self.n_targets, self.grad_norm])]).tolist()
        denom = n_targets if n_targets > 0 else 1.0
        return {"loss": loss_sum / denom, "accuracy": n_correct / denom, "grad_norm": grad_norm,
                "n_targets": n_targets}


@runtime_checkable
class Engine(Protocol):
    name: str
    module: torch.nn.Module  # the unwrapped CaduceusForMaskedLM
    optimizer: torch.optim.Optimizer
    loss: MaskedLMLoss
    rank: int
    world_size: int

    def train_step(self, micro_batches: list[dict], lr: float) -> StepResult: ...

    def eval_step(self, batch: dict) -> dict[str, float]: ...

    def save_checkpoint(self, path: Path) -> None: ...

    def load_checkpoint(self, path: Path, saved_world_size: int) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


class TrainStepMixin:
    """The shared optimizer step; engines supply forward/backward/accumulation/step hooks."""

    rank: int
    world_size: int
    device: torch.device
    optimizer: torch.optim.Optimizer

    def _adopt(self, job_cfg, model: torch.nn.Module, ctx: DistContext, loss: MaskedLMLoss) -> None:
        """What every non-DeepSpeed engine does first: take the config, the rank layout, the loss and the model."""
        self.cfg = job_cfg.engine
        self.grad_clip = job_cfg.optim.grad_clip
        self.rank, self.world_size, self.device = ctx.rank, ctx.world_size, ctx.device
        self.loss = loss
        self.module = model.to(self.device)
        if ctx.cp_size > 1:
            apply_context_parallel(self.module, ChannelAllToAll(ctx.cp_group))
        if self.cfg.compile:
            compile_blocks(self.module)

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(input ids, targets, whether each target's base was soft-masked, or None for batches without it)."""
        ids = batch["input_ids"].to(self.device, non_blocking=True).long()
        targets = batch["targets"].to(self.device, non_blocking=True).long()
        softmasked = batch.get("target_softmasked")
        return ids, targets, None if softmasked is None else softmasked.to(self.device, non_blocking=True)

    def train_step(self, micro_batches: list[dict], lr: float) -> StepResult:
        set_lr(self.optimizer, lr)
        on_device = [self._to_device(batch) for batch in micro_batches]
        local = sum(self.loss.targets_in(targets, softmasked) for _, targets, softmasked in on_device)
        global_targets = all_reduce_tensor(local.to(torch.float64).reshape(1))[0]
        # float64 division, then float32: what multiplying by the Python float world / N did
        denominator = torch.where(global_targets > 0, global_targets, 1.0)  # a weighted count may be below 1
        scale = (self.world_size / denominator).to(torch.float32)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_correct = torch.zeros((), dtype=torch.float64, device=self.device)
        for index, (ids, targets, softmasked) in enumerate(on_device):
            last = index == len(on_device) - 1
            with self._accumulation_context(last):
                sums = self.loss(self._forward(ids), targets, softmasked)
                self._backward(sums.loss_sum * scale, last)
            loss_sum += sums.loss_sum.detach().to(torch.float64)
            n_correct += sums.n_correct
        grad_norm = self._optimizer_step().to(torch.float64)
        return StepResult(loss_sum, n_correct, global_targets, grad_norm)

    @torch.no_grad()
    def eval_step(self, batch: dict) -> dict[str, float]:
        """The batch's unweighted evaluation sums (loss.EVAL_SUMS), read on the host."""
        ids, targets, softmasked = self._to_device(batch)
        if ids.shape[0] == 0:  # this rank's slice of the last batch is empty: still join the collectives
            ids = torch.full((1, ids.shape[1]), self.loss.ignore_index, dtype=ids.dtype, device=ids.device)
            targets, softmasked = ids.clone(), None
        sums = self.loss.evaluation(self._forward(ids), targets, softmasked)
        return {key: float(value) for key, value in sums.items()}

    def _accumulation_context(self, last: bool):
        return contextlib.nullcontext()

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def _optimizer_step(self) -> torch.Tensor:
        """The update; returns the global gradient norm without reading it on the host."""
        raise NotImplementedError


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile each of the model's blocks in place (before any wrapper), as torchtitan does."""
    for block in model.blocks():
        block.compile()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def fp32_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Export form of a weight: detached, on the CPU, floating point promoted to fp32."""
    tensor = tensor.detach().cpu()
    return tensor.float() if tensor.is_floating_point() else tensor
