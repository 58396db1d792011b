"""Mamba v1 mixer (docs/reference-model.md §3) and the BiMamba wrapper (docs/reference-model.md §5).

Parameters, names and initialisation follow mamba_ssm v1.2.0.post1 so that the published state
dicts load unchanged. The sequence ops go through a kernel backend (kernels.py). In training BiMamba
runs its forward and reverse directions as one grouped call (G = 2): one conv, one batched
x_proj/dt_proj and one scan instead of two of each; without autograd it runs them one after the
other, which halves the transient memory of long inputs (docs/inference.md §3).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .kernels import KernelBackend, check_backend_name, resolve_backend
from .scan import DEFAULT_CHUNK_SIZE


class Mamba(nn.Module):
    """One Mamba v1 mixer: in_proj -> causal conv + SiLU -> selective scan (z-gated) -> out_proj."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,  # config compatibility; the kernel backend decides
        backend: str = "auto",
        scan_chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__()
        check_backend_name(backend)
        self.backend = backend
        # Resolved once per device type here, so forward makes no registry call (one graph under torch.compile).
        self._kernels: dict[str, KernelBackend] = {}
        for device_type in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            with contextlib.suppress(RuntimeError):  # backend "cuda" has no CPU kernels; forward reports it
                self._kernels[device_type] = resolve_backend(backend, torch.device(device_type))
        self.scan_chunk_size = scan_chunk_size
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        E, R, N = self.d_inner, self.dt_rank, d_state

        # S4D-real A = -(1..N) per channel, D = 1; neither is decayed (docs/reference-model.md §3; docs/reference-recipe.md §5).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(E, 1))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(E))
        self.D._no_weight_decay = True
        self.in_proj = nn.Linear(d_model, 2 * E, bias=bias)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.out_proj = nn.Linear(E, d_model, bias=bias)

        std = dt_scale * R**-0.5
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise ValueError(f"ssm_cfg.dt_init={dt_init!r}; use 'random' or 'constant'")
        dt = torch.exp(torch.rand(E) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():  # inverse softplus, so softplus(bias) lies in [dt_min, dt_max]
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True

    def kernels(self, device: torch.device) -> KernelBackend:
        backend = self._kernels.get(device.type)
        return backend if backend is not None else resolve_backend(self.backend, device)

    def forward(self, hidden: Tensor) -> Tensor:
        """(B, L, D) -> (B, L, D), causal left to right."""
        y = mamba_core([self], self.in_proj(hidden).unsqueeze(0))
        return self.out_proj(y[0])


def _stack(mambas: Sequence[Mamba], get) -> Tensor:
    return torch.stack([get(m) for m in mambas])


def mamba_core(mambas: Sequence[Mamba], xz: Tensor) -> Tensor:
    """Conv, projections and scan of G Mamba mixers at once: xz (G, B, L, 2E) -> gated y (G, B, L, E)."""
    first = mambas[0]
    backend = first.kernels(xz.device)
    x, z = xz.chunk(2, dim=-1)
    conv_bias = None if first.conv1d.bias is None else _stack(mambas, lambda m: m.conv1d.bias)
    x = backend.causal_conv1d_silu(x, _stack(mambas, lambda m: m.conv1d.weight[:, 0, :]), conv_bias)
    x_dbl = torch.matmul(x, _stack(mambas, lambda m: m.x_proj.weight).transpose(1, 2).unsqueeze(1))
    dt_low, Bm, Cm = x_dbl.split([first.dt_rank, first.d_state, first.d_state], dim=-1)
    delta = torch.matmul(dt_low, _stack(mambas, lambda m: m.dt_proj.weight).transpose(1, 2).unsqueeze(1))
    A = -torch.exp(_stack(mambas, lambda m: m.A_log).float())
    return backend.selective_scan(
        x, delta, A, Bm, Cm, _stack(mambas, lambda m: m.D), z,
        _stack(mambas, lambda m: m.dt_proj.bias), first.scan_chunk_size,
    )


class BiMambaWrapper(nn.Module):
    """mamba_fwd(h) combined with flip_L(mamba_rev(flip_L(h))); in_proj/out_proj tied when weight_tie."""

    def __init__(self, d_model: int, bidirectional: bool = True, bidirectional_strategy: str = "add",
                 bidirectional_weight_tie: bool = True, **mamba_kwargs) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.strategy = bidirectional_strategy
        self.weight_tie = bidirectional_weight_tie
        self.mamba_fwd = Mamba(d_model, **mamba_kwargs)
        self.mamba_rev = Mamba(d_model, **mamba_kwargs) if bidirectional else None
        if bidirectional and bidirectional_weight_tie:
            self.mamba_rev.in_proj.weight = self.mamba_fwd.in_proj.weight
            self.mamba_rev.in_proj.bias = self.mamba_fwd.in_proj.bias
            self.mamba_rev.out_proj.weight = self.mamba_fwd.out_proj.weight
            self.mamba_rev.out_proj.bias = self.mamba_fwd.out_proj.bias

    def forward(self, hidden: Tensor) -> Tensor:
        fwd, rev = self.mamba_fwd, self.mamba_rev
        if rev is None:
            return fwd(hidden)
        xz = fwd.in_proj(hidden)
        if torch.is_grad_enabled():
            xz_rev = xz.flip(1) if self.weight_tie else rev.in_proj(hidden.flip(1))
            y_fwd, y_rev = mamba_core([fwd, rev], torch.stack([xz, xz_rev]))
        else:
            y_fwd = mamba_core([fwd], xz[None])[0]
            xz = xz.flip(1) if self.weight_tie else rev.in_proj(hidden.flip(1))  # the forward input is done with
            y_rev = mamba_core([rev], xz[None])[0]
        if self.weight_tie and self.strategy == "add":  # out_proj is linear and shared: project the sum once
            return fwd.out_proj(y_fwd + y_rev.flip(1))
        out_fwd, out_rev = fwd.out_proj(y_fwd), rev.out_proj(y_rev).flip(1)
        return out_fwd + out_rev if self.strategy == "add" else out_fwd * out_rev

