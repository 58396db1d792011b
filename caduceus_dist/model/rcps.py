"""Norms, residual adds and the reverse-complement-equivariant (RCPS) modules of Caduceus-PS (docs/reference-model.md §6).

RCPS hidden states are 2D wide: h = [h1 | h2]. flipLC (flip over length and channels) maps the
second half into the frame of the first, so one set of weights serves both halves and
f(RC(x)) = flipLC(f(x)) holds exactly. Norms compute in fp32 whatever the autocast dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Norm(nn.Module):
    """RMSNorm (rms_norm=True, weight only) or LayerNorm, computed in fp32, output in `out_dtype`."""

    def __init__(self, dim: int, eps: float, rms: bool = True) -> None:
        super().__init__()
        self.eps, self.rms = eps, rms
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if rms else nn.Parameter(torch.zeros(dim))
        if not rms:  # the reference's optimizer hooks exempt nn.LayerNorm parameters from decay
            self.weight._no_weight_decay = True

    def forward(self, x: Tensor, out_dtype: torch.dtype | None = None, rc_halves: bool = False) -> Tensor:
        """rc_halves: x is (.., 2D) and the second half uses the channel-reversed weight (= flipLC trick)."""
        out_dtype = out_dtype or x.dtype
        xf = x.float()
        weight, bias = self.weight.float(), None if self.bias is None else self.bias.float()
        if rc_halves:
            xf = xf.unflatten(-1, (2, -1))
            weight = torch.stack([weight, weight.flip(0)])
            bias = None if bias is None else torch.stack([bias, bias.flip(0)])
        if not self.rms:
            xf = xf - xf.mean(-1, keepdim=True)
        out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * weight
        if bias is not None:
            out = out + bias
        return (out.flatten(-2) if rc_halves else out).to(out_dtype)


def add_residual(hidden: Tensor, residual: Tensor | None, residual_in_fp32: bool) -> Tensor:
    """residual + hidden computed in fp32, kept in the residual's dtype (fp32 when residual_in_fp32)."""
    if residual is None:
        return hidden.float() if residual_in_fp32 else hidden
    out_dtype = torch.float32 if residual_in_fp32 else residual.dtype
    return (residual.float() + hidden.float()).to(out_dtype)


class RCPSAddNormWrapper(nn.Module):
    """Non-fused RCPS add+norm: holds the norm as `submodule` (state-dict name `norm.submodule.weight`)."""

    def __init__(self, submodule: Norm) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: Tensor, out_dtype: torch.dtype | None = None, rc_halves: bool = True) -> Tensor:
        if not rc_halves:
            raise ValueError("RCPSAddNormWrapper always normalises both RC halves")
        return self.submodule(x, out_dtype, rc_halves=True)


class RCPSEmbedding(nn.Module):
    """[Emb(ids) | flipLC(Emb(rc(ids)))]: per position [E[x_t] | channel-reversed E[comp(x_t)]]."""

    def __init__(self, vocab_size: int, d_model: int, complement_map: list[int]) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.register_buffer("complement_map", torch.tensor(complement_map, dtype=torch.long))

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        fwd = self.embedding(input_ids)
        rc = self.embedding(self.complement_map[input_ids]).flip(-1)
        return torch.cat([fwd, rc], dim=-1)


class RCPSWrapper(nn.Module):
    """[m(h1) | flipLC(m(flipLC(h2)))], with m a BiMambaWrapper. The RC half is computed as
    flip_C(m_swapped(flip_C(h2))), m's two scan directions trading parameters (docs/context-parallel.md §2):
    equal, and no length flip of the hidden states, which context parallelism splits over ranks. Training
    runs both halves as one grouped call; without autograd `mix` runs them one after the other, which
    halves the mixer's transient memory (docs/inference.md §3)."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, hidden: Tensor) -> Tensor:
        first, second = hidden.chunk(2, dim=-1)
        out_first, out_second = self.submodule.mix([(first, False), (second.flip(-1), True)])
        return torch.cat([out_first, out_second.flip(-1)], dim=-1)


class RCPSLMHead(nn.Module):
    """logits = h1 @ W^T + reverse_C(h2) @ W[complement]^T with W the (tied) embedding."""

    def __init__(self, d_model: int, vocab_size: int, complement_map: list[int]) -> None:
        super().__init__()
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.register_buffer("complement_map", torch.tensor(complement_map, dtype=torch.long))

    def forward(self, hidden: Tensor) -> Tensor:
        first, second = hidden.chunk(2, dim=-1)
        weight = self.lm_head.weight
        return first @ weight.t().to(first.dtype) + second.flip(-1) @ weight[self.complement_map].t().to(first.dtype)
