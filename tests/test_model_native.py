"""The "native" kernel backend (C scan and conv) against the pure-PyTorch backend, its determinism, and
its fallback. Parity with the sequential reference scan is in test_model_scan.py (both backends)."""

from __future__ import annotations

import pytest
import torch

from caduceus_dist import native
from caduceus_dist.loss import mlm_loss
from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM, kernels, native_ops, scan
from caduceus_dist.model.kernels import NativeKernels, TorchKernels, check_backend_name, resolve_backend

pytestmark = pytest.mark.skipif(native_ops.library() is None,
                                reason="native kernels unavailable: no C compiler or CADUCEUS_NATIVE=0")


def random_scan_inputs(G, Bt, L, E, N, seed):
    gen = torch.Generator().manual_seed(seed)
    u, delta, z = (torch.randn(G, Bt, L, E, generator=gen) for _ in range(3))
    A = -torch.rand(G, E, N, generator=gen) * 3 - 0.1
    Bm, Cm = (torch.randn(G, Bt, L, N, generator=gen) for _ in range(2))
    D, delta_bias = torch.randn(G, E, generator=gen), torch.randn(G, E, generator=gen) - 1
    return [u, delta, A, Bm, Cm, D, z, delta_bias]


def output_and_grads(fn, inputs, seed=0):
    """fn(*inputs) and the gradients of a random projection of it w.r.t. every input that is a float tensor."""
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((out * weight).sum(), [t for t in leaves if t is not None])
    return [out, *grads]


def rel_err(ours, theirs):
    return ((ours - theirs).norm() / theirs.norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize(("G", "Bt", "L", "E", "N", "chunk"),
                         [(2, 2, 1, 8, 16, 0), (2, 1, 77, 24, 16, 0), (1, 3, 130, 17, 4, 16), (2, 2, 64, 32, 16, 64)])
def test_native_scan_matches_torch_scan(G, Bt, L, E, N, chunk):
    inputs = random_scan_inputs(G, Bt, L, E, N, seed=L)
    native_results = output_and_grads(lambda *t: native_ops.selective_scan(*t, chunk_size=chunk), inputs)
    torch_results = output_and_grads(lambda *t: scan.selective_scan(*t, chunk_size=chunk), inputs)
    for name, ours, theirs in zip(("out", "u", "delta", "A", "B", "C", "D", "z", "delta_bias"), native_results,
                                  torch_results, strict=True):
        assert rel_err(ours, theirs) < 1e-5, name


def test_native_scan_reads_a_strided_gate_in_place():
    """z is the second half of in_proj's output in the model: a view with row stride 2E."""
    inputs = random_scan_inputs(2, 2, 21, 12, 4, seed=3)
    zz = torch.randn(2, 2, 21, 24, generator=torch.Generator().manual_seed(4))
    strided = output_and_grads(lambda zz, *rest: native_ops.selective_scan(*rest[:6], zz[..., 12:], rest[6]),
                               [zz, *inputs[:6], inputs[7]])
    contiguous = output_and_grads(lambda zz, *rest: native_ops.selective_scan(*rest[:6], zz[..., 12:].contiguous(),
                                                                              rest[6]), [zz, *inputs[:6], inputs[7]])
    for a, b in zip(strided, contiguous, strict=True):
        assert torch.equal(a, b)
    assert strided[1][..., :12].abs().max() == 0  # the gradient lands in z's half only


def test_native_scan_backward_reads_a_broadcast_gradient_in_place():
    """out.sum() hands backward a stride-0 gradient: same result as the materialised one."""
    inputs = [t.requires_grad_() for t in random_scan_inputs(2, 2, 17, 8, 4, seed=6)]
    broadcast = torch.autograd.grad(native_ops.selective_scan(*inputs).sum(), inputs)
    out = native_ops.selective_scan(*inputs)
    dense = torch.autograd.grad(out, inputs, grad_outputs=torch.ones_like(out))
    for a, b in zip(broadcast, dense, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kernel", ["scan", "conv"])
def test_native_results_are_bitwise_identical_for_any_thread_count(kernel):
    """Sequences are split over threads but each is computed the same way, and per-sequence partial
    gradients of shared parameters are summed in a fixed order: no dependence on scheduling."""
    if kernel == "scan":
        inputs = random_scan_inputs(2, 3, 50, 16, 8, seed=1)
        fn = native_ops.selective_scan
    else:
        gen = torch.Generator().manual_seed(2)
        inputs = [torch.randn(2, 3, 50, 16, generator=gen), torch.randn(2, 16, 4, generator=gen),
                  torch.randn(2, 16, generator=gen)]
        fn = native_ops.causal_conv1d_silu
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            runs.append(output_and_grads(fn, inputs))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("length", [1, 3, 41])
def test_native_conv_matches_torch_conv_on_a_strided_view(with_bias, length):
    """The conv reads the first half of in_proj's output in place (row stride 2E)."""
    gen = torch.Generator().manual_seed(length)
    G, Bt, E, K = 2, 3, 20, 4
    xz = torch.randn(G, Bt, length, 2 * E, generator=gen)
    weight, bias = torch.randn(G, E, K, generator=gen), torch.randn(G, E, generator=gen) if with_bias else None

    def conv(backend):
        return lambda xz, w, b=None: backend.causal_conv1d_silu(xz.chunk(2, dim=-1)[0], w, b)

    inputs = [xz, weight] + ([bias] if with_bias else [])
    for ours, theirs in zip(output_and_grads(conv(NativeKernels()), inputs),
                            output_and_grads(conv(TorchKernels), inputs), strict=True):
        assert rel_err(ours, theirs) < 1e-6


def test_native_conv_keeps_the_input_dtype_under_bf16():
    x = torch.randn(2, 1, 9, 8, dtype=torch.bfloat16)
    weight, bias = torch.randn(2, 8, 4), torch.randn(2, 8)
    out = native_ops.causal_conv1d_silu(x, weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, TorchKernels.causal_conv1d_silu(x, weight, bias))


def build_model(backend: str) -> CaduceusForMaskedLM:
    torch.manual_seed(0)
    return CaduceusForMaskedLM(CaduceusConfig(d_model=32, n_layer=2, vocab_size=12, rcps=True, backend=backend))


def test_native_model_matches_torch_model_in_logits_and_all_gradients():
    ids = torch.randint(7, 11, (2, 45), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("native", "torch"):
        model = build_model(backend)
        logits = model(ids)
        mlm_loss(logits, ids)[0].backward()
        results[backend] = (logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    (logits, grads), (ref_logits, ref_grads) = results["native"], results["torch"]
    assert rel_err(logits, ref_logits) < 1e-5
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name in grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-4, name


@pytest.fixture
def native_disabled(monkeypatch):
    """CADUCEUS_NATIVE=0 for the test, with the load cache cleared before and after."""
    monkeypatch.setenv("CADUCEUS_NATIVE", "0")
    native.load.cache_clear()
    yield
    monkeypatch.delenv("CADUCEUS_NATIVE")
    native.load.cache_clear()


def test_caduceus_native_0_falls_back_to_torch(native_disabled):
    assert native_ops.library() is None
    assert resolve_backend("auto", torch.device("cpu")).name == "torch"
    mixer = build_model("auto").caduceus.backbone.layers[0].mixer.submodule.mamba_fwd
    assert mixer.kernels(torch.device("cpu")).name == "torch"


def test_forcing_native_backend_when_disabled_fails_naming_the_fix(native_disabled):
    with pytest.raises(RuntimeError, match=r"kernel backend 'native' needs a C compiler.*backend='torch'"):
        check_backend_name("native")
    with pytest.raises(RuntimeError, match="native CPU kernels are unavailable"):
        native_ops.selective_scan(*random_scan_inputs(1, 1, 4, 2, 2, seed=0))


def test_native_backend_refuses_non_cpu_devices():
    with pytest.raises(RuntimeError, match="kernel backend 'native' got tensors on meta"):
        resolve_backend("native", torch.device("meta"))
    with pytest.raises(RuntimeError, match="native kernels run on CPU tensors, got meta"):
        native_ops.selective_scan(*[t.to("meta") for t in random_scan_inputs(1, 1, 4, 2, 2, seed=0)])
    assert kernels.KERNEL_BACKENDS["native"] is NativeKernels
