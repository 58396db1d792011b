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
from typing import Protocol

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
        """(B, L, D) -> (B, L, D), causal left to right (a whole sequence: no sharding)."""
        y = mamba_core([self], self.in_proj(hidden).unsqueeze(0))
        return self.out_proj(y[0])


class SequenceSharding(Protocol):
    """How the sequence ops see a sequence split over ranks (context parallelism). The model only calls
    these three operations; engine/context_parallel.py implements them with collectives
    (docs/context-parallel.md). Without one (None) the whole sequence is on this rank."""

    def exchange(self, tensor: Tensor, scatter_dim: int, gather_dim: int) -> Tensor:
        """All-to-all: split `scatter_dim` over the ranks, concatenate what arrives along `gather_dim`."""

    def channels(self, total: int) -> slice:
        """This rank's slice of `total` channels (the inverse of exchange's split)."""

    def sum_partials(self, tensor: Tensor) -> Tensor:
        """The sum of every rank's `tensor` (differentiable: the gradient is summed too)."""


def _stack(mambas: Sequence[Mamba], get) -> Tensor:
    return torch.stack([get(m) for m in mambas])


def mamba_core(mambas: Sequence[Mamba], xz: Tensor, sharding: SequenceSharding | None = None) -> Tensor:
    """Conv, projections and scan of G Mamba mixers at once: xz (G, B, L, 2E) -> gated y (G, B, L, E).

    With `sharding`, xz holds this rank's slice of the channels of x and of z over the whole length:
    conv, dt_proj and the scan are per channel, and x_proj's partial products are summed over the ranks
    (in fp32, whatever the autocast dtype)."""
    first = mambas[0]
    backend = first.kernels(xz.device)
    channels = slice(None) if sharding is None else sharding.channels(first.d_inner)
    x, z = xz.chunk(2, dim=-1)
    conv_bias = None if first.conv1d.bias is None else _stack(mambas, lambda m: m.conv1d.bias[channels])
    x = backend.causal_conv1d_silu(x, _stack(mambas, lambda m: m.conv1d.weight[channels, 0, :]), conv_bias)
    x_dbl = torch.matmul(x, _stack(mambas, lambda m: m.x_proj.weight[:, channels]).transpose(1, 2).unsqueeze(1))
    if sharding is not None:
        x_dbl = sharding.sum_partials(x_dbl.float()).to(x_dbl.dtype)
    dt_low, Bm, Cm = x_dbl.split([first.dt_rank, first.d_state, first.d_state], dim=-1)
    delta = torch.matmul(dt_low, _stack(mambas, lambda m: m.dt_proj.weight[channels]).transpose(1, 2).unsqueeze(1))
    A = -torch.exp(_stack(mambas, lambda m: m.A_log[channels]).float())
    return backend.selective_scan(
        x, delta, A, Bm, Cm, _stack(mambas, lambda m: m.D[channels]), z,
        _stack(mambas, lambda m: m.dt_proj.bias[channels]), first.scan_chunk_size,
    )


class BiMambaWrapper(nn.Module):
    """mamba_fwd(h) combined with flip_L(mamba_rev(flip_L(h))); in_proj/out_proj tied when weight_tie.

    Every length flip happens inside `mix`, on the scan inputs and outputs, so the same code serves a
    sequence split over ranks: there the scans see the whole length for a slice of the channels."""

    def __init__(self, d_model: int, bidirectional: bool = True, bidirectional_strategy: str = "add",
                 bidirectional_weight_tie: bool = True, **mamba_kwargs) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.strategy = bidirectional_strategy
        self.weight_tie = bidirectional_weight_tie
        self.sharding: SequenceSharding | None = None  # set by context parallelism, never saved
        self.mamba_fwd = Mamba(d_model, **mamba_kwargs)
        self.mamba_rev = Mamba(d_model, **mamba_kwargs) if bidirectional else None
        self._tie_weights()

    def _tie_weights(self) -> None:
        """With weight_tie, mamba_rev's in_proj/out_proj are mamba_fwd's. transformers 4.x calls this hook after
        loading a checkpoint, which otherwise leaves the second names as separate, uninitialised parameters."""
        if self.mamba_rev is not None and self.weight_tie:
            for name in ("in_proj", "out_proj"):
                rev, fwd = getattr(self.mamba_rev, name), getattr(self.mamba_fwd, name)
                rev.weight, rev.bias = fwd.weight, fwd.bias

    def forward(self, hidden: Tensor) -> Tensor:
        return self.mix([(hidden, False)])[0]

    def _scans(self, swapped: bool) -> list[tuple[Mamba, bool]]:
        """(mixer, runs right to left) of each scan. `swapped` trades the directions' parameters: the RC half
        of a PS layer, flipLC(m(flipLC(h))) = flip_C(m_swapped(flip_C(h))) (docs/context-parallel.md §2)."""
        fwd, rev = self.mamba_fwd, self.mamba_rev
        if rev is None:
            return [(fwd, swapped)]
        return [(rev, False), (fwd, True)] if swapped else [(fwd, False), (rev, True)]

    def mix(self, inputs: list[tuple[Tensor, bool]]) -> list[Tensor]:
        """Each (hidden (B, L, D), swapped) through the mixer. In training all scans of all inputs run as
        one grouped call (one conv, one batched x_proj/dt_proj, one scan); without autograd one after the
        other, each input projected and each flipped input made only when its scans run, which bounds the
        transient memory of long inputs (docs/inference.md §3)."""
        if len(inputs) > 1 and not torch.is_grad_enabled():
            return [self.mix([item])[0] for item in inputs]
        scans = [(index, mamba, backward) for index, (_, swapped) in enumerate(inputs)
                 for mamba, backward in self._scans(swapped)]
        keys = [(index, id(self._projections(mamba))) for index, mamba, _ in scans]
        projected = self._project(inputs, scans, keys)
        if torch.is_grad_enabled():
            stacked = torch.stack([projected[key].flip(1) if backward else projected[key]
                                   for key, (_, _, backward) in zip(keys, scans, strict=True)])
            ys = mamba_core([mamba for _, mamba, _ in scans], stacked, self.sharding).unbind(0)
        else:
            ys = []
            for position, (key, (_, mamba, backward)) in enumerate(zip(keys, scans, strict=True)):
                xz = projected[key] if key in keys[position + 1:] else projected.pop(key)  # last use: let it go
                xz = xz.flip(1) if backward else xz
                ys.append(mamba_core([mamba], xz[None], self.sharding)[0])
                del xz
        aligned = [y.flip(1) if backward else y for y, (_, _, backward) in zip(ys, scans, strict=True)]
        return [self._combine([(mamba, y) for (index, mamba, _), y in zip(scans, aligned, strict=True) if index == wanted])
                for wanted in range(len(inputs))]

    def _projections(self, mamba: Mamba) -> Mamba:
        """The mixer whose in_proj/out_proj serve `mamba`'s scans: mamba_fwd for tied directions, so an input
        is projected once for both."""
        return self.mamba_fwd if self.weight_tie else mamba

    def _project(self, inputs: list[tuple[Tensor, bool]], scans: list[tuple[int, Mamba, bool]],
                 keys: list[tuple[int, int]]) -> dict:
        """key (input, id of the projecting mixer) -> xz; with a sharding, exchanged to the whole length for
        this rank's channels: (B, L/cp, 2E) -> (B, L, 2E/cp), x and z alike."""
        projected = {}
        for key, (index, mamba, _) in zip(keys, scans, strict=True):
            if key not in projected:
                projected[key] = self._projections(mamba).in_proj(inputs[index][0])
        if self.sharding is None:
            return projected
        stacked = torch.stack(list(projected.values())).unflatten(-1, (2, -1))
        exchanged = self.sharding.exchange(stacked, scatter_dim=-1, gather_dim=2).flatten(-2)
        return dict(zip(projected, exchanged.unbind(0), strict=True))

    def _combine(self, outputs: list[tuple[Mamba, Tensor]]) -> Tensor:
        """The input's scan outputs, aligned by position, through out_proj and the bidirectional strategy."""
        def to_positions(y: Tensor) -> Tensor:
            return y if self.sharding is None else self.sharding.exchange(y, scatter_dim=1, gather_dim=-1)

        if len(outputs) == 1 or (self.weight_tie and self.strategy == "add"):  # linear and shared: project the sum
            total = outputs[0][1] if len(outputs) == 1 else outputs[0][1] + outputs[1][1]
            return self._projections(outputs[0][0]).out_proj(to_positions(total))
        projected = [self._projections(mamba).out_proj(to_positions(y)) for mamba, y in outputs]
        return projected[0] + projected[1] if self.strategy == "add" else projected[0] * projected[1]
