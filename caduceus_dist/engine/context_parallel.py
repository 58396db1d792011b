"""Context parallelism: one sequence split over the `engine.cp` ranks of a group (docs/context-parallel.md).

Each rank of a CP group holds a contiguous slice of the positions of the same sequences. Everything in
Caduceus is per position except the Mamba sequence ops; around those, `ChannelAllToAll` (the model's
`SequenceSharding`) trades positions for channels with one all-to-all, so every rank scans the whole
length, both directions, for 1/cp of the inner channels, and trades back before out_proj. x_proj mixes
channels: its partial products are summed over the group. The collectives are autograd functions: the
backward of an all-to-all is the opposite all-to-all, the backward of the sum is a sum.

Gradients of the (replicated) parameters come out partial on every rank: the data-parallel reduction
over the whole world (DDP, FSDP2) sums them over the CP group too, and the loss scale world / N
(engine/base.py) makes that the exact gradient of the global mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from caduceus_dist.model.mamba import BiMambaWrapper


def _all_to_all(tensor: Tensor, scatter_dim: int, gather_dim: int, group) -> Tensor:
    """Chunk i of `scatter_dim` goes to group rank i; the chunks received are concatenated along `gather_dim`."""
    size = dist.get_world_size(group)
    scatter_dim, gather_dim = scatter_dim % tensor.dim(), gather_dim % tensor.dim()
    send = torch.stack(tensor.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _Exchange(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: Tensor, scatter_dim: int, gather_dim: int, group) -> Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(tensor, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad.contiguous(), gather_dim, scatter_dim, ctx.group), None, None, None


class _SumOverGroup(torch.autograd.Function):
    """Every rank's partial summed; each rank uses the sum for its own channels, so the gradient is summed too."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


class ChannelAllToAll:
    """The model's SequenceSharding (model/mamba.py) over one CP process group."""

    def __init__(self, group):
        self.group, self.rank, self.size = group, dist.get_rank(group), dist.get_world_size(group)

    def exchange(self, tensor: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
        return _Exchange.apply(tensor, scatter_dim, gather_dim, self.group)

    def channels(self, total: int) -> slice:
        width = total // self.size
        return slice(self.rank * width, (self.rank + 1) * width)

    def sum_partials(self, tensor: Tensor) -> Tensor:
        return _SumOverGroup.apply(tensor, self.group)


def apply_context_parallel(model: nn.Module, sharding: ChannelAllToAll | None) -> None:
    """Give every bidirectional mixer of `model` the sharding (None: back to whole sequences)."""
    for module in model.modules():
        if isinstance(module, BiMambaWrapper):
            module.sharding = sharding
