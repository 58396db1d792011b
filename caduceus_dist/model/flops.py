"""Model FLOPs per token for MFU reporting (forward + backward, every direction and RCPS half)."""

from __future__ import annotations

from caduceus_dist.model.config import CaduceusConfig


def flops_per_token(config: CaduceusConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per token = 3 * forward (backward = 2 * forward, the usual convention).

    Forward per token, with D = d_model, E = expand*D, N = d_state, R = dt_rank, K = d_conv,
    V = padded vocab (a multiply-add counts 2):
      one Mamba  = 2*D*2E (in_proj) + 2*K*E (conv) + 2*E*(R+2N) (x_proj) + 2*R*E (dt_proj)
                   + 9*E*N (scan: discretise, recurrence, C contraction; mamba_ssm's own count)
                   + 3*E (D skip, z gate) + 2*E*D (out_proj)
      one layer  = halves * (directions * Mamba + 4*D (add + RMSNorm))
      head       = halves * 2*D*V
      forward    = n_layer * layer + head
    directions = 2 when bidirectional (the tied in_proj/out_proj still do their work in both
    directions), halves = 2 for RCPS (both channel halves run through the same weights).
    Caduceus is linear in length, so seq_len does not change the per-token count; it is accepted so
    callers can use one signature for every model family.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    D, E, N, R = config.d_model, config.d_inner, config.ssm["d_state"], config.dt_rank
    K, V = config.ssm["d_conv"], config.padded_vocab_size
    mamba = 2 * D * 2 * E + 2 * K * E + 2 * E * (R + 2 * N) + 2 * R * E + 9 * E * N + 3 * E + 2 * E * D
    directions = 2 if config.bidirectional else 1
    halves = 2 if config.rcps else 1
    layer = halves * (directions * mamba + 4 * D)
    forward = config.n_layer * layer + halves * 2 * D * V
    return float(3 * forward)
