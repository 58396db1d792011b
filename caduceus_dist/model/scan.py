"""Pure-PyTorch selective scan (docs/reference-model.md §4) for CPUs and any device without the CUDA kernels.

The recurrence x_t = a_t * x_{t-1} + b_t with a = exp(delta*A), b = delta*B*u runs over chunks of
`chunk_size` positions; only the (batch, chunk, E, N) state tensors of one chunk exist at a time, and
the state at each chunk start is carried over (and saved for backward). Inside a chunk a two-level
scan keeps the work linear: a short sequential pass over the positions of every sub-chunk at once
(whole-tensor ops, strided views), then a pass over sub-chunks that adds the carried state times the
running product of a. Only products of a are ever formed (never exp of a long sum followed by a
division), so strongly negative delta*A underflows to the exact limit 0 instead of producing NaN.

Backward is a reverse-time scan of the same shape, dx_t = C_t*dy_t + a_{t+1}*dx_{t+1}; states are
recomputed chunk by chunk from the saved chunk-start states, so memory stays near
O(B*E*N*chunk + B*E*L) instead of the O(B*E*N*L) an autograd graph over positions would keep.

Layout is time-major because that is what the linear layers produce: u, delta, z (G, B, L, E);
B, C (G, B, L, N); A (G, E, N); D, delta_bias (G, E). G groups carry their own A/D/delta_bias, which
lets BiMamba run its forward and reverse directions (different weights) in one call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK_SIZE = 0  # auto
AUTO_CHUNK_ELEMENTS = 2**19  # ~2 MB per fp32 chunk buffer: the backward's four buffers stay cache-resident


def auto_chunk_size(rows: int, d_state: int, d_inner: int, length: int) -> int:
    """Largest power of two in [4, 64] whose (rows, chunk, N, E) buffer holds <= AUTO_CHUNK_ELEMENTS."""
    per_position = max(1, rows * d_state * d_inner)
    chunk = 4
    while chunk < 64 and 2 * chunk * per_position <= AUTO_CHUNK_ELEMENTS:
        chunk *= 2
    return min(chunk, max(length, 1))


def _sub_chunk_size(length: int) -> int:
    """Balances the two Python loops of the two-level scan (2*c + length/c ops)."""
    return max(1, round(math.sqrt(length / 2)))


def _scan_inplace(a: Tensor, x: Tensor, h0: Tensor | None, reverse: bool) -> None:
    """x <- states of h_t = a_t * h_{t+-1} + x_t along dim 2, starting from h0; a is overwritten.

    Forward (reverse=False): h_t = a_t*h_{t-1} + x_t with h_{-1} = h0.
    Reverse (reverse=True):  h_t = a_t*h_{t+1} + x_t with h_{T} = h0.
    """
    length = x.shape[2]
    if length == 0:
        return
    c = _sub_chunk_size(length)
    # Level 1: sequential over the c positions of every sub-chunk at once; a becomes the running product.
    for j in range(1, c):
        start = j if not reverse else (length - 1 - j) % c
        prev = start - 1 if not reverse else start + 1
        cur = slice(start, None, c)
        n = len(range(start, length, c))
        if n == 0:
            continue
        x_cur, a_cur = x[:, :, cur], a[:, :, cur]
        x_cur.addcmul_(a_cur, x[:, :, prev::c][:, :, :n])
        a_cur.mul_(a[:, :, prev::c][:, :, :n])
    # Level 2: carry the true state from sub-chunk to sub-chunk.
    state = h0
    n_sub = -(-length // c)
    for k in range(n_sub):
        if not reverse:
            block, last = slice(k * c, min((k + 1) * c, length)), min((k + 1) * c, length) - 1
        else:
            lo = max(0, length - (k + 1) * c)
            block, last = slice(lo, length - k * c), lo
        if state is not None:
            x[:, :, block].addcmul_(a[:, :, block], state.unsqueeze(2))
        state = x[:, :, last]


class SelectiveScan(torch.autograd.Function):
    """The selective scan with delta_softplus=True, D skip and z gating, in fp32.

    Inside a chunk the state tensors are laid out (G, B, T, N, E): E innermost keeps every
    elementwise op and every reduction over N vectorised along contiguous channels.
    """

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size):
        out_dtype = u.dtype
        u, delta, Bm, Cm, z = (t.float() for t in (u, delta, Bm, Cm, z))
        A, D, delta_bias = A.float(), D.float(), delta_bias.float()
        G, Bt, L, E = u.shape
        N = A.shape[-1]
        A_t = A.transpose(1, 2).contiguous()[:, None, None]  # (G, 1, 1, N, E)
        dt = F.softplus(delta + delta_bias[:, None, None, :])
        dtu = dt * u
        y = torch.empty_like(u)
        starts = range(0, L, chunk_size)
        chunk_h0 = u.new_zeros(len(starts), G, Bt, N, E)
        decay = u.new_empty(G, Bt, min(chunk_size, L), N, E)
        states = torch.empty_like(decay)
        for i, s in enumerate(starts):
            e = min(s + chunk_size, L)
            a, h = decay[:, :, : e - s], states[:, :, : e - s]
            torch.mul(dt[:, :, s:e, None, :], A_t, out=a).exp_()
            torch.mul(dtu[:, :, s:e, None, :], Bm[:, :, s:e, :, None], out=h)
            _scan_inplace(a, h, chunk_h0[i] if i > 0 else None, reverse=False)
            y[:, :, s:e] = torch.matmul(Cm[:, :, s:e, None, :], h).squeeze(-2)
            if i + 1 < len(starts):
                chunk_h0[i + 1].copy_(h[:, :, -1])
        y_skip = torch.addcmul(y, u, D[:, None, None, :])
        out = y_skip * F.silu(z)
        ctx.save_for_backward(u, delta, A, Bm, Cm, D, z, delta_bias, y_skip, chunk_h0)
        ctx.chunk_size = chunk_size
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, Bm, Cm, D, z, delta_bias, y_skip, chunk_h0 = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        G, Bt, L, E = u.shape
        N = A.shape[-1]
        A_t = A.transpose(1, 2).contiguous()[:, None, None]
        dout = dout.float()
        pre = delta + delta_bias[:, None, None, :]
        dt = F.softplus(pre)
        dtu = dt * u
        sig_z = torch.sigmoid(z)
        dz = dout * y_skip * sig_z * (1 + z * (1 - sig_z))
        dy = dout * z * sig_z
        dD = (dy * u).sum(dim=(1, 2))
        du = dy * D[:, None, None, :]
        d_dtu, d_dt = torch.empty_like(u), torch.empty_like(u)
        dB, dC = torch.empty_like(Bm), torch.empty_like(Cm)
        dA_t = A.new_zeros(G, N, E)
        T = min(chunk_size, L)
        decay, scratch, states, grads = (u.new_empty(G, Bt, T, N, E) for _ in range(4))
        carry = None  # a_{s+T} * g_{s+T}, handed from the chunk after this one
        starts = range(0, L, chunk_size)
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(s + chunk_size, L)
            a, tmp, h, g = (buf[:, :, : e - s] for buf in (decay, scratch, states, grads))
            dt_c, dtu_c, dy_c = dt[:, :, s:e, None, :], dtu[:, :, s:e, None, :], dy[:, :, s:e, None, :]
            B_c, C_c = Bm[:, :, s:e, :, None], Cm[:, :, s:e, :, None]
            # Recompute this chunk's states from its saved start state.
            torch.mul(dt_c, A_t, out=a).exp_()
            tmp.copy_(a)
            torch.mul(dtu_c, B_c, out=h)
            _scan_inplace(tmp, h, chunk_h0[i] if i > 0 else None, reverse=False)
            dC[:, :, s:e] = torch.mul(h, dy_c, out=tmp).sum(-1)
            # a_t * h_{t-1}, formed directly (h_t - b_t would cancel catastrophically when a_t*h_{t-1} << b_t).
            prev_decay, h_prev = tmp, h
            torch.mul(a[:, :, 1:], h_prev[:, :, :-1], out=prev_decay[:, :, 1:])
            if i > 0:
                torch.mul(a[:, :, 0], chunk_h0[i], out=prev_decay[:, :, 0])
            else:
                prev_decay[:, :, 0].zero_()
            scratch2 = h  # the states are no longer needed
            # Adjoint states g_t = C_t*dy_t + a_{t+1}*g_{t+1}: position t's coefficient is a[t+1].
            torch.mul(dy_c, C_c, out=g)
            if carry is not None:
                g[:, :, -1] += carry
            _scan_inplace(a[:, :, 1:], g[:, :, :-1], g[:, :, -1], reverse=True)
            carry = a[:, :, 0] * g[:, :, 0]
            dB[:, :, s:e] = torch.mul(g, dtu_c, out=scratch2).sum(-1)
            d_dtu[:, :, s:e] = torch.matmul(Bm[:, :, s:e, None, :], g).squeeze(-2)
            q = prev_decay.mul_(g)  # dL/da_t * a_t
            dA_t += torch.mul(q, dt_c, out=scratch2).sum(dim=(1, 2))
            d_dt[:, :, s:e] = torch.mul(q, A_t, out=scratch2).sum(-2)
        du += d_dtu * dt
        d_dt += d_dtu * u
        d_pre = d_dt * torch.sigmoid(pre)
        d_bias = d_pre.sum(dim=(1, 2))
        return du, d_pre, dA_t.transpose(1, 2), dB, dC, dD, dz, d_bias, None


def selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Grouped, time-major selective scan; see the module docstring for shapes. chunk_size 0: auto."""
    if chunk_size < 0:
        raise ValueError(f"scan_chunk_size must be >= 0 (0 = auto), got {chunk_size}")
    if chunk_size == 0:
        chunk_size = auto_chunk_size(u.shape[0] * u.shape[1], A.shape[-1], u.shape[-1], u.shape[2])
    return SelectiveScan.apply(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size)
