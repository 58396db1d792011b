"""The Engine protocol every parallelism wrapper implements, and the step logic they share.

Loss normalisation (why `train_step` looks the way it does): the loss of an optimizer step is the
mean over every masked target of the *global* batch. Each rank counts its targets, one all-reduce
gives the global count N, and every micro-batch back-propagates `sum_of_its_losses * world / N`.
Data-parallel wrappers average gradients over ranks, so the update is exactly the gradient of the
global mean whatever the split into ranks and micro-batches (1 rank x 2 micro-batches equals
2 ranks x 1 micro-batch).
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist

from caduceus_dist.engine.config import EngineConfig
from caduceus_dist.model import mlm_loss
from caduceus_dist.model.tokenizer import PAD_ID
from caduceus_dist.optim import set_lr

IGNORE_ID = PAD_ID  # targets equal to [PAD] are not scored (spec 1.9)
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@runtime_checkable
class Engine(Protocol):
    name: str
    module: torch.nn.Module  # the unwrapped CaduceusForMaskedLM
    optimizer: torch.optim.Optimizer
    rank: int
    world_size: int

    def train_step(self, micro_batches: list[dict], lr: float) -> dict[str, float]: ...

    def eval_step(self, batch: dict) -> tuple[float, int, int]: ...

    def save_checkpoint(self, path: Path) -> None: ...

    def load_checkpoint(self, path: Path, saved_world_size: int) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(cfg: EngineConfig) -> DistContext:
    """Join (or create) the process group; torchrun, the deepspeed launcher and plain python alike.

    A plain `python` run gets a one-process group too, so the training loop has a single code path.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistContext(rank, world, local_rank, device)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """One collective for several scalars (float64 keeps token counts exact)."""
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return buf.tolist()


def masked_sums(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(sum of the MLM loss over targets, number of targets, number predicted right)."""
    loss_sum, n_targets = mlm_loss(logits, targets, reduction="sum")
    with torch.no_grad():
        mask = targets != IGNORE_ID
        n_correct = int(((logits.argmax(-1) == targets) & mask).sum())
    return loss_sum, int(n_targets), n_correct


class TrainStepMixin:
    """The shared optimizer step; engines supply forward/backward/accumulation/step hooks."""

    rank: int
    world_size: int
    device: torch.device
    optimizer: torch.optim.Optimizer

    def _adopt(self, job_cfg, model: torch.nn.Module, ctx: DistContext) -> None:
        """What every non-DeepSpeed engine does first: take the config, the rank layout and the model."""
        self.cfg = job_cfg.engine
        self.grad_clip = job_cfg.optim.grad_clip
        self.rank, self.world_size, self.device = ctx.rank, ctx.world_size, ctx.device
        self.module = model.to(self.device)
        if self.cfg.compile:
            compile_layers(self.module)

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"].to(self.device, non_blocking=True).long()
        targets = batch["targets"].to(self.device, non_blocking=True).long()
        return ids, targets

    def train_step(self, micro_batches: list[dict], lr: float) -> dict[str, float]:
        set_lr(self.optimizer, lr)
        local_targets = sum(int((mb["targets"] != IGNORE_ID).sum()) for mb in micro_batches)
        (global_targets,) = all_reduce_sum([local_targets], self.device)
        scale = self.world_size / max(global_targets, 1.0)
        loss_sum, n_correct = 0.0, 0
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            ids, targets = self._to_device(batch)
            with self._accumulation_context(last):
                logits = self._forward(ids)
                micro_loss, _, micro_correct = masked_sums(logits, targets)
                self._backward(micro_loss * scale, last)
            loss_sum += float(micro_loss.detach())
            n_correct += micro_correct
        grad_norm = self._optimizer_step()
        loss_sum, n_correct = all_reduce_sum([loss_sum, n_correct], self.device)
        denom = max(global_targets, 1.0)
        return {
            "loss": loss_sum / denom,
            "accuracy": n_correct / denom,
            "grad_norm": grad_norm,
            "n_targets": global_targets,
        }

    @torch.no_grad()
    def eval_step(self, batch: dict) -> tuple[float, int, int]:
        ids, targets = self._to_device(batch)
        if ids.shape[0] == 0:  # this rank's slice of the last batch is empty: still join the collectives
            ids = torch.full((1, ids.shape[1]), IGNORE_ID, dtype=ids.dtype, device=ids.device)
            targets = ids.clone()
        logits = self._forward(ids)
        loss_sum, n_targets, n_correct = masked_sums(logits, targets)
        return float(loss_sum), n_targets, n_correct

    def _accumulation_context(self, last: bool):
        return contextlib.nullcontext()

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        raise NotImplementedError

    def _optimizer_step(self) -> float:
        raise NotImplementedError


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each Caduceus layer in place (before any wrapper), as torchtitan does per block."""
    for layer in model.caduceus.backbone.layers:
        layer.compile()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


def fp32_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Export form of a weight: detached, on the CPU, floating point promoted to fp32."""
    tensor = tensor.detach().cpu()
    return tensor.float() if tensor.is_floating_point() else tensor
