"""Hugging Face export with the real transformers package: `python -m caduceus_dist.export` of a
published-layout checkpoint loads through AutoModel / AutoModelForMaskedLM /
AutoModelForSequenceClassification (trust_remote_code) with the logits of the independent reference
(tests/reference_caduceus.py), under transformers 5.x here and 4.46 in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hf_checks
import pytest
import reference_caduceus as ref
import torch

from caduceus_dist import export
from caduceus_dist.model import CaduceusForMaskedLM
from caduceus_dist.model.hf_io import AUTO_MAP, HUB_CODE_FILES

REPO = Path(__file__).resolve().parents[1]
TRANSFORMERS_4_46 = REPO / ".venv" / "transformers-4.46"  # scripts/setup.sh --test installs it there
VARIANTS = {"Ph": (False, True), "PS-fused": (True, True), "PS-nonfused": (True, False)}


def published_checkpoint(directory: Path, rcps: bool, fused: bool) -> tuple[dict, dict]:
    """A directory as the Hub has it: reference names, tied tensors once, the reference's auto_map."""
    cfg = ref.hub_config(32, 2, rcps, fused) | {"auto_map": AUTO_MAP}
    weights = ref.random_state_dict(cfg, seed=3)
    ref.save_reference(directory, cfg, weights)
    return cfg, weights


@pytest.fixture(params=sorted(VARIANTS))
def exported(request, tmp_path):
    rcps, fused = VARIANTS[request.param]
    cfg, weights = published_checkpoint(tmp_path / "published", rcps, fused)
    assert export.main([str(tmp_path / "published"), "--out", str(tmp_path / "hf")]) == 0
    return tmp_path / "hf", cfg, weights


def test_published_checkpoint_loads_through_the_auto_classes_with_reference_logits(exported):
    out, cfg, weights = exported
    assert {p.name for p in out.iterdir()} == {"config.json", "tokenizer_config.json", "model.safetensors",
                                               *HUB_CODE_FILES}
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    got = hf_checks.check_export(str(out))
    expected = ref.reference_logits(cfg, weights, got["ids"])
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    with torch.no_grad():
        ours = CaduceusForMaskedLM.from_pretrained(out).caduceus(got["ids"])
    torch.testing.assert_close(got["hidden"], ours, rtol=1e-5, atol=1e-5)


def test_the_same_export_loads_under_transformers_4_46(exported, tmp_path):
    if not (TRANSFORMERS_4_46 / "transformers").is_dir():
        pytest.skip(f"transformers 4.46 is not installed in {TRANSFORMERS_4_46} (scripts/setup.sh --test does it)")
    out, cfg, weights = exported
    env = os.environ | {"PYTHONPATH": str(TRANSFORMERS_4_46), "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "hf_checks.py"), str(out), str(tmp_path / "got.pt")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout + done.stderr[-3000:]
    assert "transformers/__init__" not in done.stderr
    got = torch.load(tmp_path / "got.pt")
    expected = ref.reference_logits(cfg, weights, got["ids"])
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from transformers import AutoModelForMaskedLM

    published_checkpoint(tmp_path / "published", rcps=True, fused=True)
    assert export.main([str(tmp_path / "published"), "--out", str(tmp_path / "hf")]) == 0
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
        if checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()  # transformers 5.x renamed it
            assert model.caduceus.backbone.gradient_checkpointing
        ids = hf_checks.dna_ids()
        model(ids, labels=ids).loss.backward()
        grads.append(model.get_input_embeddings().embedding.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_export_of_a_hugging_face_directory_refuses_step_and_its_own_directory(tmp_path, capsys):
    published = tmp_path / "published"
    published_checkpoint(published, rcps=False, fused=True)
    before = {p.name: p.read_bytes() for p in published.iterdir()}
    assert export.main([str(published), "--step", "3", "--out", str(tmp_path / "hf")]) == 2
    assert "is a Hugging Face model directory; --step only applies to a run directory" in capsys.readouterr().err
    assert export.main([str(published), "--out", str(published)]) == 2
    assert "is the input directory; choose another --out" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in published.iterdir()} == before  # nothing rewritten
    assert not (tmp_path / "hf").exists()
