"""Plain PyTorch: one process, or DistributedDataParallel over several (the simplest baseline).

Checkpoints go through torch.distributed.checkpoint, as FSDP2's do: DCP stores a tensor that every
rank holds once, so the ranks split the writing of a save. Every rank needs the whole state back, so
at resume rank 0 reads the checkpoint once and broadcasts it (N readers of the same file would put N
times the checkpoint through the file system). Checkpoints of caduceus-dist 0.1 (`model_optim.pt`,
written by rank 0) still load.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from caduceus_dist.distributed import DistContext, broadcast_object
from caduceus_dist.engine.base import DCP_DIR, TrainStepMixin, autocast, fp32_cpu
from caduceus_dist.loss import MaskedLMLoss
from caduceus_dist.optim.adamw import build_optimizer

LEGACY_FILE = "model_optim.pt"  # the DDP checkpoint of caduceus-dist 0.1
CHUNK_ELEMENTS = 1 << 22  # 16 MB of fp32: enough chunks for the ranks to share a save, few enough to be cheap


def pack(state: dict) -> tuple[dict[str, torch.Tensor], io.BytesIO]:
    """(chunks, skeleton): every tensor of `state` concatenated per dtype on the CPU and cut into fixed-size chunks,
    and the rest of `state` with each tensor replaced by (dtype, offset, shape). DCP writes one item
    per tensor; ~1,100 small tensors made a save ~7x a torch.save. Fixed-size chunks do not depend on
    the number of ranks, and DCP spreads them over the ranks that write."""
    parts: dict[torch.dtype, list[torch.Tensor]] = {}
    sizes: dict[torch.dtype, int] = {}

    def strip(node):
        if isinstance(node, torch.Tensor):
            offset = sizes.get(node.dtype, 0)
            parts.setdefault(node.dtype, []).append(node.detach().reshape(-1).cpu())  # AdamW's steps live on the CPU
            sizes[node.dtype] = offset + node.numel()
            return ("tensor", str(node.dtype).removeprefix("torch."), offset, list(node.shape))
        if isinstance(node, dict):
            return {key: strip(value) for key, value in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(strip(value) for value in node)
        return node

    skeleton = io.BytesIO()
    torch.save(strip(state), skeleton)
    chunks = {}
    for dtype, tensors in parts.items():
        flat = torch.cat(tensors)
        for index, chunk in enumerate(flat.split(CHUNK_ELEMENTS)):
            chunks[f"{str(dtype).removeprefix('torch.')}_{index:04d}"] = chunk.clone()
    return chunks, skeleton


def unpack(chunks: dict[str, torch.Tensor], skeleton: io.BytesIO) -> dict:
    """The inverse of `pack` (views into the concatenated chunks)."""
    flats: dict[str, torch.Tensor] = {}
    for key in sorted(chunks):
        flats.setdefault(key.rsplit("_", 1)[0], []).append(chunks[key])
    flat = {dtype: torch.cat(pieces) for dtype, pieces in flats.items()}
    skeleton.seek(0)

    def fill(node):
        if isinstance(node, tuple) and len(node) == 4 and node[0] == "tensor":
            _, dtype, offset, shape = node
            numel = math.prod(shape)
            return flat[dtype][offset:offset + numel].view(shape)
        if isinstance(node, dict):
            return {key: fill(value) for key, value in node.items()}
        if isinstance(node, list | tuple):
            return type(node)(fill(value) for value in node)
        return node

    return fill(torch.load(skeleton, weights_only=True))


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

    def _state(self) -> dict:
        """Model tensors once each (the RC-equivariant model ties weights: its state_dict names 14 M
        elements for 7.7 M parameters, and DCP, unlike torch.save, would store every name), the optimizer
        keyed by parameter name, and the fp16 loss scaler."""
        unique = {name for name, _ in self.module.named_parameters()} | {name for name, _ in self.module.named_buffers()}
        model_state = {name: t for name, t in self.module.state_dict().items() if name in unique}
        return {"model": model_state, "optim": get_optimizer_state_dict(self.module, self.optimizer),
                "scaler": self.scaler.state_dict()}

    def save_checkpoint(self, path: Path) -> None:
        chunks, skeleton = pack(self._state())
        dcp.save({"chunks": chunks, "skeleton": skeleton}, checkpoint_id=str(Path(path) / DCP_DIR))

    @torch.no_grad()
    def load_checkpoint(self, path: Path, saved_world_size: int) -> None:
        # Full replicas: the files are the same whatever the number of ranks that wrote or read them.
        if (Path(path) / LEGACY_FILE).exists():
            self._load_legacy(Path(path) / LEGACY_FILE)
            return
        current = self._state()  # its model tensors are the parameters themselves
        chunks, skeleton = pack(current)  # this engine's layout: the template DCP loads into
        if self.rank == 0:
            loaded = {"chunks": chunks, "skeleton": skeleton}
            dcp.load(loaded, checkpoint_id=str(Path(path) / DCP_DIR), no_dist=True)
            skeleton = loaded["skeleton"]
        if self.world_size > 1:
            for chunk in chunks.values():  # a few large broadcasts, the same keys on every rank
                on_device = chunk.to(self.device)  # NCCL broadcasts device tensors; gloo takes the chunk itself
                dist.broadcast(on_device, src=0)
                chunk.copy_(on_device)
            skeleton = io.BytesIO(broadcast_object(skeleton.getvalue() if self.rank == 0 else None))
        state = unpack(chunks, skeleton)
        for name, tensor in current["model"].items():
            tensor.copy_(state["model"][name])
        set_optimizer_state_dict(self.module, self.optimizer, state["optim"],
                                 options=StateDictOptions(full_state_dict=True))
        self.scaler.load_state_dict(state["scaler"])

    def _load_legacy(self, file: Path) -> None:
        state = torch.load(file, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: fp32_cpu(v) for k, v in self.module.state_dict().items()}
