/* The two sequence ops of a Mamba mixer on the CPU, forward and backward, for caduceus_dist/model/native_ops.py:
 * the selective scan (docs/reference-model.md §4) and, at the end of this file, the causal depthwise conv + SiLU that feeds
 * it (one file because both use exp_approx and caduceus_dist.native keys its cache on one source).
 *
 *   h_t = exp(dt_t * A) * h_{t-1} + dt_t * u_t * B_t        (state (N, E) per sequence, h_{-1} = 0)
 *   out_t = (sum_n C_t[n] h_t[n] + D * u_t) * silu(z_t)     dt = softplus(delta + delta_bias)
 *
 * One call handles sequences [first, first + count) of a grouped, time-major batch: delta, u, out and
 * the gradients are contiguous (S, L, E); z and dout are (S, L, E) read through sequence and row
 * strides (z is usually the second half of in_proj's output; dout may be broadcast, stride 0);
 * Bm, Cm, dB, dC are (S, L, N), with S = groups * batch and
 * sequence s in group s / batch; A is (groups, N, E) (transposed so that channels are innermost, like
 * the state), D and delta_bias (groups, E). Everything, softplus, gating and skip included, is fused
 * here, so each (S, L, E) tensor is streamed once and no (S, L, E) temporary is allocated.
 *
 * Every inner loop runs over contiguous channels, so it vectorises, and a sequence's arithmetic never
 * depends on which thread or call handles it: results are bitwise identical for any split of the
 * sequences over threads. Gradients of per-group parameters (A, D, delta_bias) are written per
 * sequence (dA_part, dD_part, d_bias_part) and summed over the batch by the caller in a fixed order.
 *
 * Forward keeps the state at the start of every chunk of `chunk` positions (zeros for chunk 0).
 * Backward walks the chunks in reverse, recomputes the chunk's decays and states from its saved
 * start state into two scratch buffers, then runs the adjoint recurrence
 *     g_t = C_t * dy_t + a_{t+1} * g_{t+1}        (dy = dout * silu(z), a = exp(dt * A))
 * down the chunk, so memory is O(S*L*E + S*N*E*L/chunk) rather than O(S*L*N*E).
 */
#define _DEFAULT_SOURCE /* madvise */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Float compares may not trap here, so that gcc if-converts the clamps of exp_approx and vectorises the
 * loops around it (no reassociation: results stay bitwise reproducible). */
#pragma GCC optimize("no-trapping-math")

/* 2^x to about 2 ulp for x <= 127, written without calls (fmaf becomes one instruction) so that the
 * loops around it vectorise; exactly 0 below -126 (where an fp32 result would be denormal), the limit
 * that products of decays tend to. */
static inline float exp2_approx(float x) {
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float clamped = x < -126.0f ? -126.0f : (x > 127.0f ? 127.0f : x);
    const float k = (clamped + round_magic) - round_magic;
    const float r = clamped - k; /* exact, |r| <= 1/2 */
    /* 2^r by a degree-6 polynomial fitted for minimal relative error on [-1/2, 1/2] (2e-9 in exact
     * arithmetic, 1e-7 evaluated in fp32 by Horner). */
    float p = 1.53457918070872e-04f;
    p = fmaf(p, r, 1.3399929364910183e-03f);
    p = fmaf(p, r, 9.61848900679299e-03f);
    p = fmaf(p, r, 5.550328781771027e-02f);
    p = fmaf(p, r, 2.4022646890429056e-01f);
    p = fmaf(p, r, 6.931472057349246e-01f);
    p = fmaf(p, r, 1.0000000005541565f);
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)k + 127) << 23;
    return x < -126.0f ? 0.0f : p * scale.f;
}

/* e^x; the rounding of x*log2(e) perturbs the result by < 1e-7 * |x| relative, which never matters
 * where it is used (decays, whose contributions shrink as e^x, and sigmoid/softplus tails). */
static inline float exp_approx(float x) { return exp2_approx(x * 1.44269504088896341f); }

static inline float sigmoid_approx(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

/* log(x) for normal x > 0 to a few ulp: x = m * 2^k with m in [sqrt(1/2), sqrt(2)), then
 * log(m) = 2 atanh(s) with s = (m - 1) / (m + 1), |s| < 0.172, by its odd series to s^11. */
static inline float log_approx(float x) {
    union { float f; int32_t i; } bits = {x};
    const int32_t shifted = bits.i - 0x3f3504f3; /* 0x3f3504f3 = sqrt(1/2) */
    const int32_t k = shifted >> 23;             /* arithmetic shift: floor */
    bits.i -= k << 23;
    const float m = bits.f, s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float p = 2.0f / 11.0f;
    p = fmaf(p, s2, 2.0f / 9.0f);
    p = fmaf(p, s2, 2.0f / 7.0f);
    p = fmaf(p, s2, 2.0f / 5.0f);
    p = fmaf(p, s2, 2.0f / 3.0f);
    p = fmaf(p, s2, 2.0f);
    return fmaf((float)k, 0.693147180559945f, p * s);
}

/* softplus(x) = log(1 + e^x), returning x above 20 like torch.nn.functional.softplus. log1p(y) is
 * log(w) corrected by the rounding of w = 1 + y, so it stays accurate when y is tiny. */
static inline float softplus_approx(float x) {
    const float y = exp_approx(x < 20.0f ? x : 20.0f), w = 1.0f + y;
    const float log1p_y = log_approx(w) + (y - (w - 1.0f)) / w;
    return x > 20.0f ? x : log1p_y;
}

/* One position of the recurrence over the (N, E) state: h = a * h_prev + dt*u*B with
 * a = exp(dt*A) = 2^(dt * A_log2e), also stored in decay when decay is not NULL (inlined with a
 * constant, so the test folds away). dtu = dt*u. */
static inline void step_state(long E, long N, const float *restrict dt, const float *restrict dtu,
                              const float *restrict A_log2e, const float *restrict Bt, const float *restrict h_prev,
                              float *restrict h, float *restrict decay) {
    for (long n = 0; n < N; ++n) {
        const float b = Bt[n];
        const float *restrict a_row = A_log2e + n * E, *restrict hp = h_prev + n * E;
        float *restrict hn = h + n * E;
#pragma omp simd
        for (long e = 0; e < E; ++e) {
            const float a = exp2_approx(dt[e] * a_row[e]);
            if (decay) decay[n * E + e] = a;
            hn[e] = fmaf(a, hp[e], dtu[e] * b);
        }
    }
}

/* Ask for transparent huge pages behind a fresh output before writing it: first-touching a large
 * tensor page by page costs as much as the kernel's own pass over it (THP "madvise" mode, the usual
 * default). Only a hint: no effect on results, and a no-op where unsupported or already backed. */
static void prefer_huge_pages(float *p, long n) {
#ifdef MADV_HUGEPAGE
    const uintptr_t page = 4096, start = ((uintptr_t)p + page - 1) & ~(page - 1);
    const uintptr_t end = ((uintptr_t)(p + n)) & ~(page - 1);
    if (end > start) madvise((void *)start, end - start, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

/* A_log2e = A * log2(e) for one group, so that each decay is one exp2. */
static void scale_by_log2e(long n, const float *restrict A, float *restrict A_log2e) {
    for (long i = 0; i < n; ++i) A_log2e[i] = A[i] * 1.44269504088896341f;
}

/* dt = softplus(delta + bias) and dtu = dt * u for one position. */
static inline void inputs_row(long E, const float *restrict delta, const float *restrict bias, const float *restrict u,
                              float *restrict dt, float *restrict dtu) {
#pragma omp simd
    for (long e = 0; e < E; ++e) {
        dt[e] = softplus_approx(delta[e] + bias[e]);
        dtu[e] = dt[e] * u[e];
    }
}

/* y[e] = sum_n C[n] * h[n, e], summed in order of n. */
static inline void readout(long E, long N, const float *restrict Ct, const float *restrict h, float *restrict y) {
    memset(y, 0, (size_t)E * sizeof(float));
    for (long n = 0; n < N; ++n) {
        const float c = Ct[n];
        const float *restrict hn = h + n * E;
#pragma omp simd
        for (long e = 0; e < E; ++e) y[e] = fmaf(hn[e], c, y[e]);
    }
}

/* Returns 0, or -1 when the scratch state cannot be allocated. */
int selective_scan_fwd(long first, long count, long batch, long L, long E, long N, long chunk,
                       long z_seq_stride, long z_row_stride, const float *delta, const float *delta_bias,
                       const float *u, const float *z, const float *A, const float *Bm, const float *Cm,
                       const float *D, float *out, float *chunk_states) {
    const long NE = N * E, n_chunks = (L + chunk - 1) / chunk;
    float *scratch = malloc((size_t)(3 * NE + 3 * E) * sizeof(float));
    if (!scratch) return -1;
    float *A_log2e = scratch + 2 * NE, *y = A_log2e + NE, *dt = y + E, *dtu = dt + E;
    prefer_huge_pages(out + first * L * E, count * L * E);
    prefer_huge_pages(chunk_states + first * n_chunks * NE, count * n_chunks * NE);
    for (long s = first; s < first + count; ++s) {
        const long g = s / batch;
        const float *D_g = D + g * E, *bias_g = delta_bias + g * E;
        scale_by_log2e(NE, A + g * NE, A_log2e);
        float *state[2] = {scratch, scratch + NE}; /* ping-pong: no aliasing, so the update vectorises */
        memset(state[1], 0, (size_t)NE * sizeof(float));
        for (long t = 0; t < L; ++t) {
            const long row = (s * L + t) * E;
            const float *prev = state[(t + 1) & 1];
            if (t % chunk == 0)
                memcpy(chunk_states + (s * n_chunks + t / chunk) * NE, prev, (size_t)NE * sizeof(float));
            inputs_row(E, delta + row, bias_g, u + row, dt, dtu);
            step_state(E, N, dt, dtu, A_log2e, Bm + (s * L + t) * N, prev, state[t & 1], NULL);
            readout(E, N, Cm + (s * L + t) * N, state[t & 1], y);
            const float *restrict u_t = u + row, *restrict z_t = z + s * z_seq_stride + t * z_row_stride;
            float *restrict out_t = out + row;
#pragma omp simd
            for (long e = 0; e < E; ++e) out_t[e] = (y[e] + D_g[e] * u_t[e]) * z_t[e] * sigmoid_approx(z_t[e]);
        }
    }
    free(scratch);
    return 0;
}

/* Returns 0, or -1 when the scratch buffers cannot be allocated. d_delta is also d(delta_bias) per
 * position; dA_part (S, N, E), dD_part and d_bias_part (S, E) are per-sequence sums over positions. */
int selective_scan_bwd(long first, long count, long batch, long L, long E, long N, long chunk,
                       long z_seq_stride, long z_row_stride, long dout_seq_stride, long dout_row_stride,
                       const float *delta, const float *delta_bias, const float *u,
                       const float *z, const float *A, const float *Bm, const float *Cm, const float *D,
                       const float *chunk_states, const float *dout,
                       float *du, float *d_delta, float *dz, float *dB, float *dC,
                       float *dA_part, float *dD_part, float *d_bias_part) {
    const long NE = N * E, n_chunks = (L + chunk - 1) / chunk;
    /* states, decays, dt and dt*u of one chunk; the adjoint carry a_{t+1} * g_{t+1}; A_log2e; four rows */
    float *scratch = malloc((size_t)(2 * chunk * NE + 2 * chunk * E + 2 * NE + 4 * E) * sizeof(float));
    if (!scratch) return -1;
    float *states = scratch, *decays = states + chunk * NE, *dts = decays + chunk * NE, *dtus = dts + chunk * E;
    float *carry = dtus + chunk * E, *A_log2e = carry + NE;
    float *restrict y = A_log2e + NE, *restrict dy = y + E, *restrict d_dtu = dy + E, *restrict d_da = d_dtu + E;
    prefer_huge_pages(du + first * L * E, count * L * E);
    prefer_huge_pages(d_delta + first * L * E, count * L * E);
    prefer_huge_pages(dz + first * L * E, count * L * E);
    for (long s = first; s < first + count; ++s) {
        const long g_idx = s / batch;
        const float *A_g = A + g_idx * NE, *D_g = D + g_idx * E, *bias_g = delta_bias + g_idx * E;
        float *dA_s = dA_part + s * NE, *restrict dD_s = dD_part + s * E, *restrict dbias_s = d_bias_part + s * E;
        scale_by_log2e(NE, A_g, A_log2e);
        memset(dA_s, 0, (size_t)NE * sizeof(float));
        memset(dD_s, 0, (size_t)E * sizeof(float));
        memset(dbias_s, 0, (size_t)E * sizeof(float));
        memset(carry, 0, (size_t)NE * sizeof(float));
        for (long c = n_chunks - 1; c >= 0; --c) {
            const long start = c * chunk, T = (L - start < chunk) ? L - start : chunk;
            const float *h0 = chunk_states + (s * n_chunks + c) * NE;
            for (long j = 0; j < T; ++j) {
                const long t = start + j, row = (s * L + t) * E;
                inputs_row(E, delta + row, bias_g, u + row, dts + j * E, dtus + j * E);
                step_state(E, N, dts + j * E, dtus + j * E, A_log2e, Bm + (s * L + t) * N,
                           j ? states + (j - 1) * NE : h0, states + j * NE, decays + j * NE);
            }
            for (long j = T - 1; j >= 0; --j) {
                const long t = start + j, row = (s * L + t) * E;
                const float *restrict dt_t = dts + j * E, *restrict dtu_t = dtus + j * E;
                const float *restrict u_t = u + row;
                const float *restrict dout_t = dout + s * dout_seq_stride + t * dout_row_stride;
                const float *restrict z_t = z + s * z_seq_stride + t * z_row_stride;
                const float *Bt = Bm + (s * L + t) * N, *Ct = Cm + (s * L + t) * N;
                const float *h_t = states + j * NE, *h_prev = j ? states + (j - 1) * NE : h0;
                const float *a_t = decays + j * NE;
                /* The gate: out = y_skip * z * sigmoid(z). */
                readout(E, N, Ct, h_t, y);
                float *restrict dz_t = dz + row;
#pragma omp simd
                for (long e = 0; e < E; ++e) {
                    const float sig = sigmoid_approx(z_t[e]), y_skip = y[e] + D_g[e] * u_t[e];
                    dz_t[e] = dout_t[e] * y_skip * sig * (1.0f + z_t[e] * (1.0f - sig));
                    dy[e] = dout_t[e] * z_t[e] * sig;
                    dD_s[e] += dy[e] * u_t[e];
                }
                memset(d_dtu, 0, (size_t)(2 * E) * sizeof(float)); /* and d_da */
                for (long n = 0; n < N; ++n) {
                    const float b = Bt[n], cn = Ct[n];
                    const float *restrict hn = h_t + n * E, *restrict hpn = h_prev + n * E;
                    const float *restrict an = a_t + n * E, *restrict A_n = A_g + n * E;
                    float *restrict gn = carry + n * E, *restrict dAn = dA_s + n * E;
                    float sum_b = 0.0f, sum_c = 0.0f;
#pragma omp simd reduction(+ : sum_b, sum_c)
                    for (long e = 0; e < E; ++e) {
                        const float g = fmaf(cn, dy[e], gn[e]); /* dL/dh_t */
                        sum_c = fmaf(hn[e], dy[e], sum_c);
                        sum_b = fmaf(g, dtu_t[e], sum_b);
                        d_dtu[e] = fmaf(g, b, d_dtu[e]);
                        const float q = g * an[e] * hpn[e]; /* dL/da_t * a_t = dL/d(dt_t * A) */
                        d_da[e] = fmaf(q, A_n[e], d_da[e]);
                        dAn[e] = fmaf(q, dt_t[e], dAn[e]);
                        gn[e] = an[e] * g;
                    }
                    dB[(s * L + t) * N + n] = sum_b;
                    dC[(s * L + t) * N + n] = sum_c;
                }
                const float *restrict delta_t = delta + row;
                float *restrict du_t = du + row, *restrict d_delta_t = d_delta + row;
#pragma omp simd
                for (long e = 0; e < E; ++e) {
                    du_t[e] = d_dtu[e] * dt_t[e] + dy[e] * D_g[e];
                    /* d softplus(x) / dx = sigmoid(x) */
                    d_delta_t[e] = (d_da[e] + d_dtu[e] * u_t[e]) * sigmoid_approx(delta_t[e] + bias_g[e]);
                    dbias_s[e] += d_delta_t[e];
                }
            }
        }
    }
    free(scratch);
    return 0;
}

/* Causal depthwise conv + SiLU: out_t = silu(bias + sum_k w[k] * x_{t-K+1+k}), zeros before t = 0.
 * x is read through strides (it is usually the first half of in_proj's output, row stride 2E); w is
 * (groups, K, E), bias (groups, E) or NULL; out, dout, dx are contiguous (S, L, E). */
static inline void conv_row(long t, long E, long K, const float *x_s, long row_stride, const float *restrict w,
                            const float *restrict bias, float *restrict pre) {
    if (bias) memcpy(pre, bias, (size_t)E * sizeof(float));
    else memset(pre, 0, (size_t)E * sizeof(float));
    for (long k = 0; k < K; ++k) {
        const long src = t - K + 1 + k;
        if (src < 0) continue;
        const float *restrict x_t = x_s + src * row_stride, *restrict w_k = w + k * E;
#pragma omp simd
        for (long e = 0; e < E; ++e) pre[e] = fmaf(w_k[e], x_t[e], pre[e]);
    }
}

int causal_conv_silu_fwd(long first, long count, long batch, long L, long E, long K, long seq_stride,
                         long row_stride, const float *x, const float *w, const float *bias, float *out) {
    float *pre = malloc((size_t)E * sizeof(float));
    if (!pre) return -1;
    prefer_huge_pages(out + first * L * E, count * L * E);
    for (long s = first; s < first + count; ++s) {
        const long g = s / batch;
        for (long t = 0; t < L; ++t) {
            conv_row(t, E, K, x + s * seq_stride, row_stride, w + g * K * E, bias ? bias + g * E : NULL, pre);
            float *restrict out_t = out + (s * L + t) * E;
#pragma omp simd
            for (long e = 0; e < E; ++e) out_t[e] = pre[e] * sigmoid_approx(pre[e]);
        }
    }
    free(pre);
    return 0;
}

/* dw_part (S, K, E) and dbias_part (S, E) are per-sequence sums over positions (dbias_part ignored
 * when bias is NULL). */
int causal_conv_silu_bwd(long first, long count, long batch, long L, long E, long K, long seq_stride,
                         long row_stride, const float *x, const float *w, const float *bias, const float *dout,
                         float *dx, float *dw_part, float *dbias_part) {
    float *pre = malloc((size_t)E * sizeof(float));
    if (!pre) return -1;
    prefer_huge_pages(dx + first * L * E, count * L * E);
    for (long s = first; s < first + count; ++s) {
        const long g = s / batch;
        const float *x_s = x + s * seq_stride, *w_g = w + g * K * E;
        float *dx_s = dx + s * L * E, *dw_s = dw_part + s * K * E, *restrict db_s = dbias_part + s * E;
        memset(dx_s, 0, (size_t)(L * E) * sizeof(float));
        memset(dw_s, 0, (size_t)(K * E) * sizeof(float));
        if (bias) memset(db_s, 0, (size_t)E * sizeof(float));
        for (long t = 0; t < L; ++t) {
            conv_row(t, E, K, x_s, row_stride, w_g, bias ? bias + g * E : NULL, pre);
            const float *restrict dout_t = dout + (s * L + t) * E;
#pragma omp simd
            for (long e = 0; e < E; ++e) { /* pre <- dL/dpre; d silu(p)/dp = sig * (1 + p * (1 - sig)) */
                const float sig = sigmoid_approx(pre[e]);
                pre[e] = dout_t[e] * sig * (1.0f + pre[e] * (1.0f - sig));
            }
            if (bias) {
#pragma omp simd
                for (long e = 0; e < E; ++e) db_s[e] += pre[e];
            }
            for (long k = 0; k < K; ++k) {
                const long src = t - K + 1 + k;
                if (src < 0) continue;
                const float *restrict x_t = x_s + src * row_stride, *restrict w_k = w_g + k * E;
                float *restrict dx_t = dx_s + src * E, *restrict dw_k = dw_s + k * E;
#pragma omp simd
                for (long e = 0; e < E; ++e) {
                    dw_k[e] = fmaf(pre[e], x_t[e], dw_k[e]);
                    dx_t[e] = fmaf(w_k[e], pre[e], dx_t[e]);
                }
            }
        }
    }
    free(pre);
    return 0;
}
