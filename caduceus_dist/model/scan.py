"""Pure-PyTorch selective scan (spec 1.4) for CPUs and any device without the CUDA kernels.

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

DEFAULT_CHUNK_SIZE = 64


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


def _contract_n(states: Tensor, vec: Tensor) -> Tensor:
    """sum_n states[..., e, n] * vec[..., n] -> (..., E)."""
    return torch.matmul(states, vec.unsqueeze(-1)).squeeze(-1)


class SelectiveScan(torch.autograd.Function):
    """The selective scan with delta_softplus=True, D skip and z gating, in fp32."""

    @staticmethod
    def forward(ctx, u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size):
        out_dtype = u.dtype
        u, delta, Bm, Cm, z = (t.float() for t in (u, delta, Bm, Cm, z))
        A, D, delta_bias = A.float(), D.float(), delta_bias.float()
        G, Bt, L, E = u.shape
        N = A.shape[-1]
        dt = F.softplus(delta + delta_bias[:, None, None, :])
        dtu = dt * u
        y = torch.empty_like(u)
        starts = list(range(0, L, chunk_size))
        chunk_h0 = u.new_zeros(len(starts), G, Bt, E, N)
        h = None
        for i, s in enumerate(starts):
            e = min(s + chunk_size, L)
            if h is not None:
                chunk_h0[i] = h
            a = torch.mul(dt[:, :, s:e, :, None], A[:, None, None]).exp_()
            states = dtu[:, :, s:e, :, None] * Bm[:, :, s:e, None, :]
            _scan_inplace(a, states, h, reverse=False)
            y[:, :, s:e] = _contract_n(states, Cm[:, :, s:e])
            h = states[:, :, -1].clone()
        y_skip = torch.addcmul(y, u, D[:, None, None, :])
        out = y_skip * F.silu(z)
        ctx.save_for_backward(u, delta, A, Bm, Cm, D, z, delta_bias, y_skip, chunk_h0)
        ctx.chunk_size = chunk_size
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, dout):
        u, delta, A, Bm, Cm, D, z, delta_bias, y_skip, chunk_h0 = ctx.saved_tensors
        chunk_size = ctx.chunk_size
        L = u.shape[2]
        dout = dout.float()
        pre = delta + delta_bias[:, None, None, :]
        dt = F.softplus(pre)
        dtu = dt * u
        sig_z = torch.sigmoid(z)
        silu_z = z * sig_z
        dz = dout * y_skip * sig_z * (1 + z * (1 - sig_z))
        dy = dout * silu_z
        dD = (dy * u).sum(dim=(1, 2))
        du = dy * D[:, None, None, :]
        d_dtu = torch.empty_like(u)
        d_dt = torch.empty_like(u)
        dB = torch.empty_like(Bm)
        dC = torch.empty_like(Cm)
        dA = torch.zeros_like(A)
        carry = None  # a_{s+T} * g_{s+T} from the chunk after this one
        starts = list(range(0, L, chunk_size))
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(s + chunk_size, L)
            h0 = chunk_h0[i] if i > 0 else None
            dt_c, dtu_c, B_c, C_c, dy_c = dt[:, :, s:e], dtu[:, :, s:e], Bm[:, :, s:e], Cm[:, :, s:e], dy[:, :, s:e]
            a = torch.mul(dt_c.unsqueeze(-1), A[:, None, None]).exp_()
            running = a.clone()
            states = dtu_c.unsqueeze(-1) * B_c.unsqueeze(-2)
            _scan_inplace(running, states, h0, reverse=False)
            del running
            dC[:, :, s:e] = _contract_n(states.transpose(-1, -2), dy_c)
            # a_t * h_{t-1} = h_t - b_t, needed for the gradient through a = exp(dt*A).
            prev_decay = states.addcmul_(dtu_c.unsqueeze(-1), B_c.unsqueeze(-2), value=-1)
            g = dy_c.unsqueeze(-1) * C_c.unsqueeze(-2)
            if carry is not None:
                g[:, :, -1] += carry
            a_first = a[:, :, 0].clone()
            # g_t = d_t + a_{t+1} g_{t+1}: the coefficient of position t is a[t+1], i.e. the view a[1:].
            _scan_inplace(a[:, :, 1:], g[:, :, :-1], g[:, :, -1], reverse=True)
            carry = a_first * g[:, :, 0]
            dB[:, :, s:e] = _contract_n(g.transpose(-1, -2), dtu_c)
            d_dtu[:, :, s:e] = _contract_n(g, B_c)
            q = prev_decay.mul_(g)
            dA += torch.einsum("gbten,gbte->gen", q, dt_c)
            d_dt[:, :, s:e] = (q * A[:, None, None]).sum(-1)
        du += d_dtu * dt
        d_dt += d_dtu * u
        d_pre = d_dt * torch.sigmoid(pre)
        d_bias = d_pre.sum(dim=(1, 2))
        return du, d_pre, dA, dB, dC, dD, dz, d_bias, None


def selective_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """Grouped, time-major selective scan; see the module docstring for shapes."""
    if chunk_size < 1:
        raise ValueError(f"scan_chunk_size must be >= 1, got {chunk_size}")
    return SelectiveScan.apply(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size)
