"""`python -m caduceus_dist.export RUN --out DIR`: a 2-rank DeepSpeed ZeRO-2 or FSDP2 checkpoint becomes a
Hugging Face directory whose `from_pretrained` model gives exactly the logits of the trained weights
(read independently from the engine's own files), and bad requests fail with a clear message."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from test_resume_exact import MAX_STEPS, REPO, straight_run
from transformers import AutoModelForMaskedLM

from caduceus_dist import export
from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM
from caduceus_dist.model.hf_io import HUB_CODE_FILES


def trained_weights(checkpoint, engine: str) -> dict[str, torch.Tensor]:
    """The fp32 weights as the engine stored them, without going through any engine code."""
    if engine == "fsdp2":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(checkpoint / "dcp", checkpoint.parent / "full.pt")
        return torch.load(checkpoint.parent / "full.pt", weights_only=False)["model"]
    states = checkpoint / "deepspeed" / "mp_rank_00_model_states.pt"  # ZeRO-2: whole fp32 module weights
    return torch.load(states, weights_only=False, map_location="cpu")["module"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["zero2", "fsdp2"])
def test_export_gives_the_trained_models_logits(engine, tmp_path, tmp_path_factory):
    run = tmp_path / "run"
    shutil.copytree(straight_run(engine, tmp_path_factory) / "checkpoints", run / "checkpoints")
    out = tmp_path / "hf"
    done = subprocess.run([sys.executable, "-m", "caduceus_dist.export", str(run), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"(step {MAX_STEPS}, engine" in done.stdout and "saved by 2 rank(s)" in done.stdout
    assert {p.name for p in out.iterdir()} == {"config.json", "tokenizer_config.json", "model.safetensors",
                                               *HUB_CODE_FILES}
    assert json.loads((out / "config.json").read_text())["d_model"] == 16

    checkpoint = run / "checkpoints" / f"step_{MAX_STEPS:06d}"
    model_cfg = OmegaConf.to_container(OmegaConf.load(checkpoint / "config.yaml").model)
    reference = CaduceusForMaskedLM(CaduceusConfig(**model_cfg))
    reference.load_state_dict(trained_weights(checkpoint, engine))
    exported = CaduceusForMaskedLM.from_pretrained(out)
    assert all(p.dtype == torch.float32 for p in exported.parameters())
    ids = torch.randint(7, 12, (3, 96), generator=torch.Generator().manual_seed(0))  # A C G T N
    with torch.no_grad():
        assert torch.equal(exported(ids), reference(ids))
        through_transformers = AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)(ids).logits
        torch.testing.assert_close(through_transformers, reference(ids), rtol=1e-5, atol=1e-5)


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert export.main([str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    assert f"no checkpoints under {tmp_path / 'checkpoints'}" in capsys.readouterr().err

    step = tmp_path / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text(json.dumps({"format": "caduceus-dist-checkpoint", "format_version": 1,
                                                    "files": {"trainer_state.pt": {"bytes": 3, "sha256": "0"}}}))
    assert export.main([str(tmp_path), "--step", "7", "--out", str(tmp_path / "hf")]) == 2
    assert "has no checkpoint for step 7; available: step_000004" in capsys.readouterr().err
    assert export.main([str(tmp_path), "--step", "4", "--out", str(tmp_path / "hf")]) == 2
    assert "trainer_state.pt: missing" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()  # nothing written for a checkpoint that does not verify
