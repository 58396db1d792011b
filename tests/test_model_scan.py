"""The selective scan and causal conv of the "torch" and "native" (C) backends against straightforward
implementations of docs/reference-model.md §3, §4, and the backend registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from caduceus_dist.model import kernels, native_ops, scan
from caduceus_dist.model.kernels import TorchKernels, check_backend_name, resolve_backend

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def sequential_scan(u, delta, A, B, C, D, z, delta_bias):
    """docs/reference-model.md §4 one position at a time, on the grouped time-major layout of the package."""
    dt = F.softplus(delta + delta_bias[:, None, None, :])
    state = u.new_zeros(*u.shape[:2], *A.shape[1:])  # (G, B, E, N)
    ys = []
    for t in range(u.shape[2]):
        decay = torch.exp(dt[:, :, t, :, None] * A[:, None])
        state = decay * state + dt[:, :, t, :, None] * B[:, :, t, None, :] * u[:, :, t, :, None]
        ys.append((state * C[:, :, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=2) + D[:, None, None, :] * u
    return y * F.silu(z)


def random_inputs(G, Bt, L, E, N, seed, bias_shift=0.0, a_scale=2.0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    return [
        rnd(G, Bt, L, E), rnd(G, Bt, L, E), -torch.rand(G, E, N, generator=gen) * a_scale - 0.1,
        rnd(G, Bt, L, N), rnd(G, Bt, L, N), rnd(G, E), rnd(G, Bt, L, E), rnd(G, E) + bias_shift,
    ]


def rel_err(ours, theirs):
    return ((ours - theirs).norm() / theirs.norm().clamp(min=1e-30)).item()


@pytest.fixture(params=["torch", "native"])
def selective_scan(request):
    """The scan of each CPU backend; the native one needs a C compiler (the tests say so when it is missing)."""
    if request.param == "native":
        if native_ops.library() is None:
            pytest.skip("native kernels unavailable: no C compiler or CADUCEUS_NATIVE=0")
        return native_ops.selective_scan
    return scan.selective_scan


def check_parity(selective_scan, inputs, chunk_size):
    ours_in = [t.clone().requires_grad_() for t in inputs]
    ref_in = [t.clone().requires_grad_() for t in inputs]
    ours = selective_scan(*ours_in, chunk_size=chunk_size)
    ref = sequential_scan(*ref_in)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) < 1e-5
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(99))
    grads = torch.autograd.grad((ours * weight).sum(), ours_in)
    ref_grads = torch.autograd.grad((ref * weight).sum(), ref_in)
    for name, g, rg in zip(INPUT_NAMES, grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, rg) < 1e-5, f"d{name}: relative error {rel_err(g, rg):.2e}"


@pytest.mark.parametrize(
    ("length", "chunk_size"),
    [(1, 16), (7, 16), (16, 16), (37, 16), (64, 16), (45, 1), (45, 5), (100, 64), (150, 0)],
    ids=lambda v: str(v),
)
def test_scan_matches_sequential_forward_and_all_gradients(selective_scan, length, chunk_size):
    """Covers L < chunk, L == chunk, L not a multiple of the chunk, many chunks, chunk of 1."""
    check_parity(selective_scan, random_inputs(2, 3, length, 6, 4, seed=length * 31 + chunk_size), chunk_size)


@pytest.mark.parametrize(("groups", "batch", "length", "channels", "d_state"),
                         [(1, 1, 1, 1, 1), (2, 1, 33, 13, 16), (2, 4, 65, 40, 16), (3, 2, 9, 8, 5)])
def test_scan_parity_over_shapes(selective_scan, groups, batch, length, channels, d_state):
    """Odd channel counts (vector tails), odd state sizes, several groups and batch rows."""
    check_parity(selective_scan, random_inputs(groups, batch, length, channels, d_state, seed=length), 0)


def test_scan_strongly_negative_delta_times_a_underflows_to_exact_limit(selective_scan):
    """delta*A down to about -300 per step: products of decays underflow to 0, never NaN/inf."""
    inputs = random_inputs(1, 2, 50, 5, 8, seed=3, bias_shift=20.0, a_scale=15.0)
    dt = F.softplus(inputs[1] + inputs[7][:, None, None, :])
    assert (dt[..., None] * inputs[2][:, None, None]).min() < -200
    check_parity(selective_scan, inputs, chunk_size=8)


def test_scan_mixed_decay_regimes_across_chunks(selective_scan):
    """Half the channels barely decay, half decay fast: the carried state must be exact across chunks."""
    inputs = random_inputs(1, 2, 70, 8, 4, seed=5)
    inputs[7][:, :4] = -8.0  # softplus ~ 3e-4: long memory
    inputs[7][:, 4:] = 4.0
    check_parity(selective_scan, inputs, chunk_size=16)


def test_scan_saves_no_per_position_states_for_backward(selective_scan):
    """Memory contract: what backward keeps is O(B*E*L + chunks*B*E*N), not O(B*E*L*N)."""
    G, Bt, L, E, N, chunk = 2, 2, 256, 32, 16, 32
    inputs = [t.requires_grad_() for t in random_inputs(G, Bt, L, E, N, seed=7)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        selective_scan(*inputs, chunk_size=chunk)
    per_position_states = G * Bt * L * E * N
    inputs_and_outputs = 6 * G * Bt * L * E + 2 * G * Bt * L * N + 4 * G * E * N
    assert sum(saved) <= inputs_and_outputs + (L // chunk) * G * Bt * E * N
    assert sum(saved) < per_position_states / 2


def test_bf16_inputs_are_scanned_in_fp32_and_returned_in_bf16(selective_scan):
    inputs = random_inputs(1, 2, 20, 4, 4, seed=11)
    low = [t.bfloat16() if i not in (2, 5, 7) else t for i, t in enumerate(inputs)]
    out = selective_scan(*low, chunk_size=8)
    assert out.dtype == torch.bfloat16
    ref = sequential_scan(*[t.float() for t in low])
    assert rel_err(out.float(), ref) < 1e-2


def test_torch_causal_conv_matches_conv1d_reference():
    gen = torch.Generator().manual_seed(0)
    G, Bt, L, E, K = 2, 3, 19, 5, 4
    x = torch.randn(G, Bt, L, E, generator=gen)
    weight, bias = torch.randn(G, E, K, generator=gen), torch.randn(G, E, generator=gen)
    ours = TorchKernels.causal_conv1d_silu(x, weight, bias)
    for g in range(G):
        ref = F.conv1d(x[g].transpose(1, 2), weight[g].unsqueeze(1), bias[g], padding=K - 1, groups=E)[..., :L]
        torch.testing.assert_close(ours[g], F.silu(ref).transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_auto_chunk_size_keeps_buffers_bounded_and_negative_sizes_fail():
    from caduceus_dist.model.scan import auto_chunk_size

    assert auto_chunk_size(rows=4, d_state=16, d_inner=256, length=8192) == 32
    assert auto_chunk_size(rows=64, d_state=16, d_inner=512, length=8192) == 4  # floor for huge batches
    assert auto_chunk_size(rows=1, d_state=16, d_inner=8, length=10) == 10  # never beyond L
    with pytest.raises(ValueError, match=r"scan_chunk_size must be >= 0 \(0 = auto\), got -1"):
        scan.selective_scan(*random_inputs(1, 1, 4, 2, 2, seed=0), chunk_size=-1)


def test_unknown_backend_name_fails_naming_the_choices():
    with pytest.raises(ValueError, match=r"unknown kernel backend 'triton'.*'cuda', 'native', 'torch'"):
        check_backend_name("triton")


@pytest.mark.skipif(kernels._cuda_ops() is not None, reason="the CUDA kernels are available on this machine")
def test_forcing_cuda_backend_without_kernels_fails_with_install_hint():
    with pytest.raises(RuntimeError, match="mamba-ssm causal-conv1d"):
        check_backend_name("cuda")


def test_auto_backend_for_cpu_tensors_is_native_where_it_compiles_else_torch():
    expected = "native" if native_ops.library() is not None else "torch"
    assert resolve_backend("auto", torch.device("cpu")).name == expected


@pytest.mark.gpu
def test_cuda_kernels_match_pure_pytorch_scan_and_conv():
    """mamba-ssm / causal-conv1d kernels vs the pure-PyTorch path, forward and gradients, on a GPU."""
    pytest.importorskip("mamba_ssm", reason="mamba-ssm is not installed (pip install .[cuda])")
    pytest.importorskip("causal_conv1d", reason="causal-conv1d is not installed (pip install .[cuda])")
    cuda, ref = resolve_backend("cuda", torch.device("cuda")), TorchKernels()
    inputs = [t.cuda() for t in random_inputs(2, 3, 300, 64, 16, seed=1)]
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out_cuda, out_ref = cuda.selective_scan(*a, chunk_size=64), ref.selective_scan(*b, chunk_size=64)
    assert rel_err(out_cuda, out_ref) < 1e-4
    weight = torch.randn_like(out_ref)
    for name, ga, gb in zip(INPUT_NAMES, torch.autograd.grad((out_cuda * weight).sum(), a),
                            torch.autograd.grad((out_ref * weight).sum(), b), strict=True):
        assert rel_err(ga, gb) < 1e-3, name
    x = torch.randn(2, 3, 300, 64, device="cuda")
    w, bias = torch.randn(2, 64, 4, device="cuda"), torch.randn(2, 64, device="cuda")
    torch.testing.assert_close(cuda.causal_conv1d_silu(x, w, bias), ref.causal_conv1d_silu(x, w, bias),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_backend_model_matches_torch_backend_model():
    pytest.importorskip("mamba_ssm", reason="mamba-ssm is not installed (pip install .[cuda])")
    from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM

    config = CaduceusConfig(d_model=64, n_layer=2, vocab_size=12, rcps=True, backend="torch")
    model = CaduceusForMaskedLM(config).cuda()
    fused = CaduceusForMaskedLM(CaduceusConfig(**(vars(config) | {"backend": "cuda"}))).cuda()
    fused.load_state_dict(model.state_dict())
    ids = torch.randint(7, 11, (2, 500), device="cuda")
    torch.testing.assert_close(fused(ids), model(ids), rtol=1e-3, atol=1e-3)
