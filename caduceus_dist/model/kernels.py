"""Kernel backends for the two sequence ops of Mamba: causal depthwise conv + SiLU, and the selective scan.

One small interface, three implementations, chosen by name (`CaduceusConfig.backend`):
- "torch":  pure PyTorch, any device (the chunked scan of scan.py);
- "native": CPU only, both ops in C (native_ops.py, compiled on first use by caduceus_dist.native);
- "cuda":   the fused kernels of mamba-ssm / causal-conv1d, imported lazily, CUDA tensors only;
- "auto":   "cuda" for CUDA tensors when those packages import; otherwise "native" where it compiles
  (not with CADUCEUS_NATIVE=0), else "torch". Resolved per device, so a model built on the CPU and
  moved to a GPU picks the CUDA kernels up.

Shapes are grouped and time-major (see scan.py): x, u, delta, z (G, B, L, E); B, C (G, B, L, N);
A (G, E, N); D, delta_bias, conv bias (G, E); conv weight (G, E, K).
"""

from __future__ import annotations

import functools
import importlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .scan import selective_scan as torch_selective_scan

try:  # the C kernels; a Hugging Face export ships the model files without them (docs/inference.md §1)
    from . import native_ops
except ImportError:
    native_ops = None

CUDA_INSTALL_HINT = (
    "install a CUDA build of torch first, then `pip install --no-build-isolation mamba-ssm causal-conv1d`"
)


class KernelBackend(Protocol):
    name: str

    def causal_conv1d_silu(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def selective_scan(self, u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size: int) -> Tensor: ...


class TorchKernels:
    name = "torch"

    @staticmethod
    def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """out[t] = silu(bias + sum_k w[k] * x[t-K+1+k]) with zeros before t=0 (Conv1d padding K-1, first L).

        Computed in fp32 and cast back to x's dtype, as causal-conv1d does under autocast.
        """
        K, L = weight.shape[-1], x.shape[2]
        padded = F.pad(x.float(), (0, 0, K - 1, 0))
        weight = weight.float()
        out = padded[:, :, :L] * weight[:, None, None, :, 0]
        for k in range(1, K):
            out = torch.addcmul(out, padded[:, :, k : k + L], weight[:, None, None, :, k])
        if bias is not None:
            out = out + bias.float()[:, None, None, :]
        return F.silu(out).to(x.dtype)

    @staticmethod
    def selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size: int) -> Tensor:
        return torch_selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size)


class NativeKernels:
    """Both ops in C (native_ops.py), CPU tensors only."""

    name = "native"

    def __init__(self) -> None:
        if not _native_available():
            raise RuntimeError("kernel backend 'native' needs a C compiler (set CC) and CADUCEUS_NATIVE unset or 1; "
                               "use backend='torch' otherwise")

    @staticmethod
    def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return native_ops.causal_conv1d_silu(x, weight, bias)

    @staticmethod
    def selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size: int) -> Tensor:
        return native_ops.selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size)


def _native_available() -> bool:
    return native_ops is not None and native_ops.library() is not None


class CudaKernels:
    name = "cuda"

    def __init__(self) -> None:
        ops = _cuda_ops()
        if ops is None:
            raise RuntimeError(f"kernel backend 'cuda' needs a CUDA GPU and mamba-ssm + causal-conv1d: {CUDA_INSTALL_HINT}")
        self._conv, self._scan = ops

    def causal_conv1d_silu(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        G, B, L, E = x.shape
        channels = x.permute(1, 0, 3, 2).reshape(B, G * E, L).contiguous()
        out = self._conv(channels, weight.reshape(G * E, -1), None if bias is None else bias.reshape(-1),
                         activation="silu")
        return out.reshape(B, G, E, L).permute(1, 0, 3, 2)

    def selective_scan(self, u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size: int) -> Tensor:
        def channel_major(t: Tensor) -> Tensor:
            return t.transpose(-1, -2).contiguous()

        outs = [
            self._scan(channel_major(u[g]), channel_major(delta[g]), A[g], channel_major(Bm[g]),
                       channel_major(Cm[g]), D[g].float(), channel_major(z[g]), delta_bias[g].float(),
                       delta_softplus=True)
            for g in range(u.shape[0])
        ]
        return torch.stack(outs).transpose(-1, -2)


@functools.cache
def _cuda_ops():
    """(causal_conv1d_fn, selective_scan_fn), or None where CUDA or the packages are missing."""
    if not torch.cuda.is_available():
        return None
    try:
        conv = importlib.import_module("causal_conv1d").causal_conv1d_fn
        scan = importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
    except ImportError:
        return None
    return conv, scan


KERNEL_BACKENDS: dict[str, type] = {"torch": TorchKernels, "native": NativeKernels, "cuda": CudaKernels}


def _instance(name: str) -> KernelBackend:
    """A fresh instance (they are stateless), so availability is checked again after CADUCEUS_NATIVE changes."""
    return KERNEL_BACKENDS[name]()


def check_backend_name(name: str) -> None:
    """Fail at model construction (not mid-training) on an unknown or unavailable backend."""
    if name != "auto" and name not in KERNEL_BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose 'auto' or one of {sorted(KERNEL_BACKENDS)}")
    if name != "auto":
        _instance(name)


def resolve_backend(name: str, device: torch.device) -> KernelBackend:
    """The backend to use for tensors on `device`."""
    if name == "auto":
        name = _auto_backend_name(device)
    backend = _instance(name)
    if backend.name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"kernel backend 'cuda' got tensors on {device}; move the model to a GPU or use backend='torch'")
    if backend.name == "native" and device.type != "cpu":
        raise RuntimeError(f"kernel backend 'native' got tensors on {device}; it runs on the CPU only")
    return backend


def _auto_backend_name(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda" if _cuda_ops() is not None else "torch"
    if device.type == "cpu" and _native_available():
        return "native"
    return "torch"
