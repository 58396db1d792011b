"""CaduceusForMaskedLM: RC equivariance, bidirectionality, names/shapes/tying/counts, init, loss, groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from caduceus_dist.loss import mlm_loss
from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM, flops_per_token, param_groups
from caduceus_dist.model.tokenizer import PAD_ID

RECIPE_SIZES = [(118, 4, 470_702), (128, 4, 541_312), (256, 4, 1_934_592), (256, 8, 3_864_832), (256, 16, 7_725_312)]
MAMBA_NAMES = [("A_log", ("E", 16)), ("D", ("E",)), ("in_proj.weight", ("2E", "D")), ("conv1d.weight", ("E", 1, 4)),
               ("conv1d.bias", ("E",)), ("x_proj.weight", ("R+32", "E")), ("dt_proj.weight", ("E", "R")),
               ("dt_proj.bias", ("E",)), ("out_proj.weight", ("D", "E"))]


def small_config(**overrides) -> CaduceusConfig:
    base = dict(d_model=24, n_layer=2, vocab_size=12, residual_in_fp32=False, scan_chunk_size=16)
    return CaduceusConfig(**(base | overrides))


def build(seed=0, **overrides) -> CaduceusForMaskedLM:
    """A small model whose norm weights are randomised, so the RCPS half swap changes the outputs."""
    torch.manual_seed(seed)
    model = CaduceusForMaskedLM(small_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def reverse_complement(model: CaduceusForMaskedLM, ids: torch.Tensor) -> torch.Tensor:
    return torch.tensor(model.config.padded_complement_map())[ids.flip(1)]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "nonfused"])
@pytest.mark.parametrize(("batch", "length"), [(1, 1), (3, 17), (2, 64)])
def test_ps_is_exactly_rc_equivariant(fused, batch, length):
    model = build(rcps=True, fused_add_norm=fused)
    ids = torch.randint(0, 12, (batch, length), generator=torch.Generator().manual_seed(length))
    comp = torch.tensor(model.config.padded_complement_map())
    with torch.no_grad():
        logits, rc_logits = model(ids), model(reverse_complement(model, ids))
    expected = logits.flip(1)[..., comp]
    torch.testing.assert_close(rc_logits, expected, rtol=1e-5, atol=1e-5 * logits.abs().max().item())


def test_ph_is_not_rc_equivariant():
    model = build(rcps=False)
    ids = torch.randint(7, 11, (2, 40), generator=torch.Generator().manual_seed(0))
    comp = torch.tensor(model.config.padded_complement_map())
    with torch.no_grad():
        diff = (model(reverse_complement(model, ids)) - model(ids).flip(1)[..., comp]).abs().max()
    assert diff > 1e-2


def test_fused_and_nonfused_ps_differ_with_the_same_weights():
    """The fused RCPS path swaps channel halves at every block (docs/reference-model.md §6); the non-fused one does not."""
    fused, nonfused = build(rcps=True, fused_add_norm=True), build(rcps=True, fused_add_norm=False)
    state = {k.replace("norm.submodule.", "norm."): v for k, v in nonfused.state_dict().items()}
    state = {k.replace("norm_f.submodule.", "norm_f."): v for k, v in state.items()}
    fused.load_state_dict(state)
    ids = torch.randint(7, 11, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (fused(ids) - nonfused(ids)).abs().max() > 1e-3


@pytest.mark.parametrize("rcps", [False, True], ids=["Ph", "PS"])
def test_bidirectional_changing_one_token_changes_outputs_before_and_after(rcps):
    model = build(rcps=rcps)
    ids = torch.randint(7, 11, (1, 41), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 20] = 7 if ids[0, 20] != 7 else 8
    with torch.no_grad():
        delta = (model(ids) - model(changed)).abs().amax(dim=-1)[0]
    assert delta[:20].min() > 0 and delta[21:].min() > 0


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("variant", [
    {"rcps": True}, {"rcps": True, "fused_add_norm": False}, {"rcps": False},
    {"rcps": False, "bidirectional_weight_tie": False}, {"rcps": False, "bidirectional_strategy": "ew_multiply"},
], ids=["PS", "PS-nonfused", "Ph", "Ph-untied", "Ph-ew_multiply"])
def test_inference_runs_directions_and_halves_apart_with_the_training_paths_logits(variant, backend):
    """Without autograd BiMamba and RCPS run their groups one after the other (less memory); same logits."""
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=32, n_layer=2, vocab_size=12, backend=backend, **variant))
    ids = torch.randint(7, 12, (3, 300), generator=torch.Generator().manual_seed(1))
    training_path = model(ids)
    with torch.inference_mode():
        inference_path = model(ids)
    torch.testing.assert_close(inference_path, training_path.detach(), rtol=0, atol=1e-6)


def test_unidirectional_model_is_causal():
    model = build(rcps=False, bidirectional=False)
    ids = torch.randint(7, 11, (1, 30), generator=torch.Generator().manual_seed(3))
    changed = ids.clone()
    changed[0, 15] = 7 if ids[0, 15] != 7 else 8
    with torch.no_grad():
        delta = (model(ids) - model(changed)).abs().amax(dim=-1)[0]
    assert delta[:15].max() == 0 and delta[15:].min() > 0


def expected_state_dict_shapes(d_model: int, n_layer: int, rcps: bool, fused: bool) -> dict[str, tuple]:
    """docs/reference-model.md §2, written out independently of the model code."""
    E, R = 2 * d_model, math.ceil(d_model / 16)
    dims = {"E": E, "2E": 2 * E, "D": d_model, "R": R, "R+32": R + 32}
    out = {}
    emb = "caduceus.backbone.embeddings.word_embeddings."
    out[emb + ("embedding.weight" if rcps else "weight")] = (16, d_model)
    if rcps:
        out[emb + "complement_map"] = (16,)
    norm = "norm.submodule.weight" if rcps and not fused else "norm.weight"
    for i in range(n_layer):
        prefix = f"caduceus.backbone.layers.{i}.mixer." + ("submodule." if rcps else "")
        for direction in ("mamba_fwd", "mamba_rev"):
            for name, shape in MAMBA_NAMES:
                out[f"{prefix}{direction}.{name}"] = tuple(dims.get(s, s) for s in shape)
        out[f"caduceus.backbone.layers.{i}.{norm}"] = (d_model,)
    out["caduceus.backbone." + ("norm_f.submodule.weight" if rcps and not fused else "norm_f.weight")] = (d_model,)
    out["lm_head.lm_head.weight" if rcps else "lm_head.weight"] = (16, d_model)
    if rcps:
        out["lm_head.complement_map"] = (16,)
    return out


@pytest.mark.parametrize(("d_model", "n_layer", "count"), RECIPE_SIZES, ids=lambda v: str(v))
@pytest.mark.parametrize("rcps", [False, True], ids=["Ph", "PS"])
def test_names_shapes_tying_and_parameter_counts_of_recipe_sizes(d_model, n_layer, count, rcps):
    config = CaduceusConfig(d_model=d_model, n_layer=n_layer, vocab_size=12, rcps=rcps,
                            fused_add_norm=True, residual_in_fp32=False)
    model = CaduceusForMaskedLM(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == expected_state_dict_shapes(d_model, n_layer, rcps, fused=True)
    assert sum(p.numel() for p in model.parameters()) == count
    backbone = model.caduceus.backbone
    embedding = backbone.embeddings.word_embeddings
    head = model.lm_head.lm_head if rcps else model.lm_head
    assert head.weight is embedding.weight
    for layer in backbone.layers:
        bimamba = layer.mixer.submodule if rcps else layer.mixer
        fwd, rev = bimamba.mamba_fwd, bimamba.mamba_rev
        assert rev.in_proj.weight is fwd.in_proj.weight and rev.out_proj.weight is fwd.out_proj.weight
        for name in ("A_log", "D", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias"):
            assert fwd.get_parameter(name) is not rev.get_parameter(name), name


def test_nonfused_ps_uses_wrapper_norm_names():
    model = CaduceusForMaskedLM(small_config(rcps=True, fused_add_norm=False))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == expected_state_dict_shapes(24, 2, rcps=True, fused=False)


def test_initialisation_statistics_match_the_reference():
    """docs/reference-model.md §3, §7 for d_model 256, 16 layers."""
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=256, n_layer=16, vocab_size=12, rcps=True))
    out_bound = 1 / math.sqrt(512) / math.sqrt(16)
    for layer in model.caduceus.backbone.layers:
        fwd, rev = layer.mixer.submodule.mamba_fwd, layer.mixer.submodule.mamba_rev
        assert 0.9 * out_bound < fwd.out_proj.weight.abs().max() <= out_bound
        assert 0.9 / 16 < fwd.in_proj.weight.abs().max() <= 1 / 16
        for m in (fwd, rev):
            assert m.x_proj.weight.abs().max() <= 1 / math.sqrt(512)
            assert m.conv1d.weight.abs().max() <= 0.5 and m.conv1d.bias.abs().max() <= 0.5
            assert m.dt_proj.weight.abs().max() <= 0.25  # dt_scale * R^-0.5, R = 16
            dt = F.softplus(m.dt_proj.bias)
            assert dt.min() >= 0.001 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
            assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(512, 1))
            assert torch.equal(m.D, torch.ones(512))
        assert torch.equal(layer.norm.weight, torch.ones(256))
    std = model.caduceus.backbone.embeddings.word_embeddings.weight.std().item()
    assert 0.018 < std < 0.022


def test_weight_decay_groups_match_reference_issue_26():
    """1-layer model: 10 tensors at wd 0.1, 9 at 0.0 (biases, A_log, D, embedding/tied head)."""
    for rcps in (False, True):
        model = CaduceusForMaskedLM(small_config(n_layer=1, rcps=rcps))
        decay, no_decay = param_groups(model, 0.1)
        assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
        assert (len(decay["params"]), len(no_decay["params"])) == (10, 9)
        names = {id(p): n for n, p in model.named_parameters()}
        exempt = {names[id(p)].split(".")[-1] for p in no_decay["params"]}
        assert exempt == {"A_log", "D", "bias", "weight"}  # "weight" only for the embedding
        assert {names[id(p)] for p in no_decay["params"] if names[id(p)].endswith("weight")} == {
            "caduceus.backbone.embeddings.word_embeddings." + ("embedding.weight" if rcps else "weight")}
        all_params = decay["params"] + no_decay["params"]
        assert len({id(p) for p in all_params}) == len(all_params) == len(list(model.parameters()))


def test_mlm_loss_ignores_pad_and_is_zero_on_all_ignored_batches():
    logits = torch.randn(2, 5, 16, requires_grad=True)
    targets = torch.full((2, 5), PAD_ID)
    loss, count = mlm_loss(logits, targets)
    assert loss.item() == 0.0 and count.item() == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() == 0
    targets[0, 1], targets[1, 3], targets[1, 4] = 7, 10, 3
    loss, count = mlm_loss(logits, targets)
    picked = torch.stack([logits[0, 1], logits[1, 3], logits[1, 4]])
    expected = F.cross_entropy(picked, torch.tensor([7, 10, 3]))
    assert count.item() == 3
    torch.testing.assert_close(loss, expected)
    first, n_first = mlm_loss(logits[:1], targets[:1], reduction="sum")
    second, n_second = mlm_loss(logits[1:], targets[1:], reduction="sum")
    torch.testing.assert_close((first + second) / (n_first + n_second), expected)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        mlm_loss(logits, targets, reduction="none")


@pytest.mark.parametrize("rcps", [False, True], ids=["Ph", "PS"])
def test_gradient_checkpointing_gives_identical_gradients(rcps):
    ids = torch.randint(7, 11, (2, 33), generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointing in (False, True):
        model = build(seed=5, rcps=rcps, gradient_checkpointing=checkpointing)
        loss, _ = mlm_loss(model(ids), ids)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_bf16_autocast_gives_fp32_logits_close_to_fp32(residual_in_fp32):
    model = build(rcps=True, residual_in_fp32=residual_in_fp32)
    ids = torch.randint(7, 11, (2, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(ids)
    assert low.dtype == torch.float32
    assert ((low - ref).norm() / ref.norm()).item() < 3e-2


def test_norm_computes_in_fp32_and_residual_dtype_follows_residual_in_fp32():
    captured = {}
    for flag in (False, True):
        model = build(rcps=False, residual_in_fp32=flag)
        layer = model.caduceus.backbone.layers[1]
        layer.register_forward_hook(lambda _m, _a, out, flag=flag: captured.__setitem__(flag, out[1].dtype))
        hidden = torch.randn(1, 8, 24, dtype=torch.bfloat16)
        normed = layer.norm(hidden)
        ref = hidden.float() * torch.rsqrt(hidden.float().square().mean(-1, keepdim=True) + 1e-5) * layer.norm.weight
        assert normed.dtype == torch.bfloat16 and torch.equal(normed, ref.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            model(torch.randint(7, 11, (1, 8)))
    assert captured == {False: torch.float32, True: torch.float32}  # layer-0 residual is the fp32 embedding


def test_flops_per_token_counts_both_directions_and_halves():
    ph, ps = small_config(d_model=128, n_layer=4), small_config(d_model=128, n_layer=4, rcps=True)
    uni = small_config(d_model=128, n_layer=4, bidirectional=False)
    assert flops_per_token(ps, 1024) == pytest.approx(2 * flops_per_token(ph, 1024))
    head = 3 * 2 * 128 * 16
    assert flops_per_token(ph, 1024) - head == pytest.approx(2 * (flops_per_token(uni, 1024) - head), rel=0.01)
    # Matmul work measured by torch's FLOP counter (untied weights so each direction does its own
    # projections) must be contained in the count, and the rest (scan, conv, norms) be a minority.
    from torch.utils.flop_counter import FlopCounterMode

    untied = small_config(d_model=128, n_layer=4, bidirectional_weight_tie=False, bidirectional_strategy="ew_multiply")
    model = CaduceusForMaskedLM(untied)
    ids = torch.randint(7, 11, (1, 64))
    with FlopCounterMode(display=False) as counter:
        mlm_loss(model(ids), ids)[0].backward()
    measured = counter.get_total_flops() / ids.numel()
    total = flops_per_token(untied, 64)
    assert measured < total and (total - measured) / total < 0.3
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(ph, 0)


def test_config_rejects_unknown_ssm_key_and_strategy():
    with pytest.raises(ValueError, match=r"ssm_cfg has unknown key\(s\) \['d_stat'\]"):
        CaduceusConfig(ssm_cfg={"d_stat": 16})
    with pytest.raises(ValueError, match="bidirectional_strategy='mean' is not implemented"):
        CaduceusConfig(bidirectional_strategy="mean")


def test_config_is_an_omegaconf_structured_config():
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    base = OmegaConf.structured(CaduceusConfig)
    merged = OmegaConf.merge(base, {"d_model": 128, "rcps": True, "ssm_cfg": {"d_state": 16}})
    config = OmegaConf.to_object(merged)
    assert isinstance(config, CaduceusConfig) and config.d_model == 128 and config.rcps
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(base, {"d_modle": 128})
    with pytest.raises(ValidationError):
        OmegaConf.merge(base, {"n_layer": "many"})
