"""The "native" kernel backend: selective scan and causal conv + SiLU in C (caduceus_dist/native/selective_scan.c).

Same math, shapes and autograd contract as scan.py and kernels.TorchKernels, several times faster on
CPUs: the scan runs position by position over an (N, E) state that stays in the L1 cache with the exp
vectorised over channels, and softplus, gate, skip and activation are fused, so each (G, B, L, E) tensor
is streamed once instead of once per elementwise op, and no (G, B, L, E) temporary is allocated (on
this kind of machine first-touching a fresh 32 MB tensor costs as much as an elementwise op on it).

Scan backward recomputes states chunk by chunk from the chunk-start states that forward saved, so
memory is O(B*E*L + B*E*N*L/chunk). The independent (group, batch) sequences are split over
torch.get_num_threads() Python threads (ctypes releases the GIL); each sequence's arithmetic is the
same whichever thread runs it, and gradients of per-group parameters come back per sequence and are
summed over the batch by torch, so results are bitwise identical for any thread count.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from caduceus_dist import native

CHUNK_SIZE = 32  # positions per recomputed chunk: two (chunk, N, E) scratch buffers per thread stay in L2


def library() -> ctypes.CDLL | None:
    """The compiled kernel with its signatures declared, or None (disabled, or no C compiler)."""
    lib = native.load("selective_scan")
    return None if lib is None else _declare_signatures(lib)


@functools.cache
def _declare_signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    ptr = ctypes.c_void_p
    scan_sizes = [ctypes.c_long] * 9  # first, count, batch, L, E, N, chunk, z's sequence and row strides
    conv_sizes = [ctypes.c_long] * 8  # first, count, batch, L, E, K, x's sequence and row strides
    lib.selective_scan_fwd.argtypes = [*scan_sizes, *[ptr] * 10]
    lib.selective_scan_bwd.argtypes = [*scan_sizes, ctypes.c_long, ctypes.c_long, *[ptr] * 18]  # + dout's strides
    lib.causal_conv_silu_fwd.argtypes = [*conv_sizes, *[ptr] * 4]
    lib.causal_conv_silu_bwd.argtypes = [*conv_sizes, *[ptr] * 7]
    for kernel in (lib.selective_scan_fwd, lib.selective_scan_bwd, lib.causal_conv_silu_fwd, lib.causal_conv_silu_bwd):
        kernel.restype = ctypes.c_int
    return lib


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="selective-scan")


def _run_split(kernel, n_seq: int, args: tuple) -> None:
    """kernel(first, count, *args) over contiguous ranges of the n_seq sequences, one per thread."""
    threads = max(1, min(torch.get_num_threads(), n_seq))
    bounds = [n_seq * i // threads for i in range(threads + 1)]
    ranges = [(lo, hi - lo) for lo, hi in itertools.pairwise(bounds) if hi > lo]
    if len(ranges) == 1:
        codes = [kernel(*ranges[0], *args)]
    else:
        codes = list(_pool(threads).map(lambda r: kernel(*r, *args), ranges))
    if any(codes):
        raise MemoryError(f"{kernel.__name__}: the native kernel could not allocate its scratch buffers")


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _sequence_strides(x: Tensor) -> tuple[Tensor, int, int]:
    """x (G, B, L, E) as (tensor, sequence stride, row stride), copying only if channels are not contiguous
    or G, B do not flatten into one sequence index (conv and scan read in_proj's output through views).
    A tensor broadcast over (G, B, L), like the gradient of a sum, is read as one row with strides 0."""
    if x.stride(3) != 1 and not any(x.stride(d) for d in range(3)):
        x = x[:1, :1, :1].contiguous().expand(x.shape)
    if x.stride(3) != 1 or x.stride(0) != x.shape[1] * x.stride(1):
        x = x.contiguous()
    return x, x.stride(1), x.stride(2)


class NativeCausalConvSiLU(torch.autograd.Function):
    """kernels.TorchKernels.causal_conv1d_silu in one fused pass, fp32 compute."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x32, seq_stride, row_stride = _sequence_strides(x.float())
        G, Bt, L, E = x.shape
        w_t = weight.float().transpose(1, 2).contiguous()  # (G, K, E)
        bias32 = None if bias is None else bias.float().contiguous()
        out = x32.new_empty(G, Bt, L, E)
        _run_split(library().causal_conv_silu_fwd, G * Bt,
                   (Bt, L, E, w_t.shape[1], seq_stride, row_stride, *map(_ptr, (x32, w_t, bias32, out))))
        ctx.save_for_backward(x32, w_t, bias32)
        ctx.has_bias = bias is not None
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        x32, w_t, bias32 = ctx.saved_tensors
        G, Bt, L, E = x32.shape
        K = w_t.shape[1]
        dout = dout.float().contiguous()
        dx = dout.new_empty(G, Bt, L, E)
        dw_part, db_part = dout.new_empty(G, Bt, K, E), dout.new_empty(G, Bt, E)
        _, seq_stride, row_stride = _sequence_strides(x32)
        _run_split(library().causal_conv_silu_bwd, G * Bt,
                   (Bt, L, E, K, seq_stride, row_stride,
                    *map(_ptr, (x32, w_t, bias32, dout, dx, dw_part, db_part))))
        d_bias = db_part.sum(dim=1) if ctx.has_bias else None
        return dx, dw_part.sum(dim=1).transpose(1, 2), d_bias


class NativeSelectiveScan(torch.autograd.Function):
    """delta_softplus=True, D skip and z gating, computed in fp32 like scan.SelectiveScan."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size):
        out_dtype = u.dtype
        u, delta, Bm, Cm = (t.float().contiguous() for t in (u, delta, Bm, Cm))
        z, *z_strides = _sequence_strides(z.float())
        D, delta_bias = D.float().contiguous(), delta_bias.float().contiguous()
        G, Bt, L, E = u.shape
        N = A.shape[-1]
        A_t = A.float().transpose(1, 2).contiguous()  # (G, N, E): channels innermost, like the state
        out = torch.empty_like(u)
        chunk_states = u.new_empty(G * Bt, -(-L // chunk_size), N, E)
        _run_split(library().selective_scan_fwd, G * Bt,
                   (Bt, L, E, N, chunk_size, *z_strides,
                    *map(_ptr, (delta, delta_bias, u, z, A_t, Bm, Cm, D, out, chunk_states))))
        ctx.save_for_backward(delta, delta_bias, u, z, A_t, Bm, Cm, D, chunk_states)
        ctx.chunk_size, ctx.z_strides = chunk_size, z_strides
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        u, A_t, Bm, Cm = saved[2], saved[4], saved[5], saved[6]
        G, Bt, L, E = u.shape
        N = A_t.shape[1]
        dout, *dout_strides = _sequence_strides(dout.float())
        du, d_delta, dz = (torch.empty_like(u) for _ in range(3))  # dz contiguous, whatever z's strides
        dB, dC = torch.empty_like(Bm), torch.empty_like(Cm)
        dA_part = u.new_empty(G, Bt, N, E)
        dD_part, d_bias_part = u.new_empty(G, Bt, E), u.new_empty(G, Bt, E)
        _run_split(library().selective_scan_bwd, G * Bt,
                   (Bt, L, E, N, ctx.chunk_size, *ctx.z_strides, *dout_strides,
                    *map(_ptr, (*saved, dout, du, d_delta, dz, dB, dC, dA_part, dD_part, d_bias_part))))
        dA = dA_part.sum(dim=1).transpose(1, 2)
        return du, d_delta, dA, dB, dC, dD_part.sum(dim=1), dz, d_bias_part.sum(dim=1), None


def _require_library(x: Tensor) -> None:
    if library() is None:
        raise RuntimeError("the native CPU kernels are unavailable (CADUCEUS_NATIVE=0 or no C compiler); "
                           "use kernel backend 'torch'")
    if x.device.type != "cpu":
        raise RuntimeError(f"the native kernels run on CPU tensors, got {x.device}; use kernel backend 'auto'")


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """kernels.TorchKernels.causal_conv1d_silu on the C kernel (CPU tensors)."""
    _require_library(x)
    return NativeCausalConvSiLU.apply(x, weight, bias)


def selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size: int = 0) -> Tensor:
    """scan.selective_scan on the C kernel (CPU tensors). chunk_size 0: CHUNK_SIZE."""
    if chunk_size < 0:
        raise ValueError(f"scan_chunk_size must be >= 0 (0 = auto), got {chunk_size}")
    _require_library(u)
    return NativeSelectiveScan.apply(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size or CHUNK_SIZE)
