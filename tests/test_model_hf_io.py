"""Checkpoint compatibility with the published Hugging Face layout, against the independent reference."""

from __future__ import annotations

import json

import pytest
import reference_caduceus as ref
import torch
from safetensors import safe_open

from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM
from caduceus_dist.model.hf_io import load_hf_state_dict, load_weights

VARIANTS = [(False, True), (True, True), (True, False)]
VARIANT_IDS = ["Ph", "PS-fused", "PS-nonfused"]


def ids_batch(length=37, seed=0):
    return torch.randint(0, 12, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("rcps", "fused"), VARIANTS, ids=VARIANT_IDS)
def test_reference_checkpoint_loads_into_ours_with_the_same_logits(tmp_path, rcps, fused):
    cfg = ref.hub_config(32, 2, rcps, fused)
    weights = ref.random_state_dict(cfg, seed=1)
    ref.save_reference(tmp_path, cfg, weights)
    model = CaduceusForMaskedLM.from_pretrained(tmp_path)
    ids = ids_batch()
    with torch.no_grad():
        ours = model(ids)
    theirs = ref.reference_logits(cfg, weights, ids)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * theirs.abs().max().item())


@pytest.mark.parametrize(("rcps", "fused"), VARIANTS, ids=VARIANT_IDS)
def test_our_checkpoint_loads_into_the_reference_with_the_same_logits(tmp_path, rcps, fused):
    torch.manual_seed(2)
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=32, n_layer=2, vocab_size=12, rcps=rcps,
                                               fused_add_norm=fused, residual_in_fp32=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    cfg, weights = ref.load_reference(tmp_path)
    expected_names = set(ref.random_state_dict(ref.hub_config(32, 2, rcps, fused), seed=0))
    assert set(weights) == expected_names  # tied tensors stored once, under the reference's names
    ids = ids_batch(seed=3)
    with torch.no_grad():
        ours = model(ids)
    theirs = ref.reference_logits(cfg, weights, ids)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


def test_saved_files_follow_the_published_layout(tmp_path):
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=32, n_layer=1, vocab_size=12, rcps=True))
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
    assert "lm_head.lm_head.weight" not in names
    assert not any("mamba_rev.in_proj" in n or "mamba_rev.out_proj" in n for n in names)
    assert {"lm_head.complement_map", "caduceus.backbone.embeddings.word_embeddings.complement_map"} <= names
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "caduceus" and config["vocab_size"] == 16 and config["rcps"] is True
    assert config["complement_map"] == {str(k): v for k, v in ref.HUB_COMPLEMENT.items()}
    assert not {"backend", "gradient_checkpointing", "scan_chunk_size"} & set(config)


@pytest.mark.parametrize("rcps", [False, True], ids=["Ph", "PS"])
def test_save_load_round_trip_is_bit_exact_and_reties(tmp_path, rcps):
    torch.manual_seed(4)
    # Same kernels on both sides (the bitwise logits check below); the runtime fields are overridden at load.
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=24, n_layer=2, vocab_size=12, rcps=rcps, backend="torch"))
    model.save_pretrained(tmp_path)
    loaded = CaduceusForMaskedLM.from_pretrained(tmp_path, backend="torch", gradient_checkpointing=True)
    assert loaded.config.gradient_checkpointing and loaded.config.backend == "torch"
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    ids = ids_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    head = loaded.lm_head.lm_head if rcps else loaded.lm_head
    assert head.weight is loaded.caduceus.backbone.embeddings.word_embeddings.weight
    layer = loaded.caduceus.backbone.layers[0].mixer
    bimamba = layer.submodule if rcps else layer
    assert bimamba.mamba_rev.in_proj.weight is bimamba.mamba_fwd.in_proj.weight


def test_lightning_checkpoint_with_model_prefix_loads(tmp_path):
    cfg = ref.hub_config(32, 1, rcps=True)
    weights = ref.random_state_dict(cfg, seed=6)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in weights.items()}, "global_step": 500}, ckpt)
    model = CaduceusForMaskedLM(CaduceusConfig.from_hf_dict(cfg))
    load_weights(model, ckpt)
    ids = ids_batch(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref.reference_logits(cfg, weights, ids), rtol=1e-5, atol=1e-4)


def test_checkpoint_with_a_different_config_fails_listing_keys_and_shapes(tmp_path):
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=32, n_layer=2, vocab_size=12))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(d_model=48, n_layer=3)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights_before = (tmp_path / "model.safetensors").read_bytes()
    with pytest.raises(ValueError) as err:
        CaduceusForMaskedLM.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "missing keys" in message and "caduceus.backbone.layers.2.norm.weight" in message
    assert "caduceus.backbone.norm_f.weight: checkpoint (32,) vs model (48,)" in message
    assert (tmp_path / "model.safetensors").read_bytes() == weights_before


def test_ph_weights_into_ps_model_fail_naming_unexpected_and_missing_keys():
    ph = CaduceusForMaskedLM(CaduceusConfig(d_model=16, n_layer=1, vocab_size=12))
    ps = CaduceusForMaskedLM(CaduceusConfig(d_model=16, n_layer=1, vocab_size=12, rcps=True))
    with pytest.raises(ValueError, match=r"missing keys .*word_embeddings\.embedding\.weight.*unexpected keys"):
        load_hf_state_dict(ps, ph.state_dict(), source="ph-weights")


def test_bad_config_files_fail_naming_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)
    cfg = ref.hub_config(16, 1, rcps=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"d_modle": 3}))
    with pytest.raises(ValueError, match=r"config.json: unknown CaduceusConfig key\(s\) \['d_modle'\]"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type is 'mamba', expected 'caduceus'"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        CaduceusForMaskedLM.from_pretrained(tmp_path)


def test_hub_config_round_trips_through_our_config():
    cfg = ref.hub_config(256, 16, rcps=True)
    config = CaduceusConfig.from_hf_dict(cfg)
    assert (config.d_model, config.n_layer, config.rcps, config.residual_in_fp32) == (256, 16, True, False)
    assert config.padded_vocab_size == 16 and config.dt_rank == 16
    again = config.to_hf_dict()
    for key in ("d_model", "n_layer", "vocab_size", "ssm_cfg", "initializer_cfg", "complement_map", "rcps",
                "fused_add_norm", "residual_in_fp32", "bidirectional_strategy", "model_type"):
        assert again[key] == cfg[key], key
