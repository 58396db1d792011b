"""Resume checks what it loads: a checkpoint saved by another engine, ZeRO stage or precision is refused
at start-up with both values and the supported conversions, instead of failing deep in DeepSpeed or DCP
(or loading through the wrong path); the changes that are supported go through."""

from __future__ import annotations

import pytest
from test_first_hour import DEMO, PRETRAIN, QUICK, run, sample_shards  # noqa: F401

from caduceus_dist.checkpoint.restore import engine_mismatches


@pytest.mark.parametrize(("saved", "current", "refused"), [
    ({"name": "ddp"}, {"name": "ddp", "precision": "bf16"}, []),  # a manifest from before engine_config
    ({"name": "ddp"}, {"name": "fsdp2", "precision": "fp32"}, ["engine.name"]),
    ({"name": "fsdp2", "precision": "fp32"}, {"name": "fsdp2", "precision": "bf16"}, []),
    ({"name": "ddp", "precision": "fp32"}, {"name": "ddp", "precision": "bf16"}, []),
    ({"name": "ddp", "precision": "fp32"}, {"name": "ddp", "precision": "fp16"}, ["engine.precision"]),
    ({"name": "deepspeed", "precision": "bf16", "zero_stage": 0},
     {"name": "deepspeed", "precision": "fp32", "zero_stage": 0}, ["engine.precision"]),
    ({"name": "deepspeed", "precision": "bf16", "zero_stage": 1},
     {"name": "deepspeed", "precision": "bf16", "zero_stage": 2}, ["engine.zero_stage"]),
])
def test_which_engine_changes_a_resume_accepts(saved, current, refused):
    assert [problem.split(" (")[0] for problem in engine_mismatches(saved, current)] == refused


def test_another_engine_is_refused_with_both_values(tmp_path, sample_shards):  # noqa: F811
    args = [PRETRAIN, "--config", DEMO, f"run_dir={tmp_path / 'run'}", f"data.shards={sample_shards}", *QUICK]
    assert run(*args, "train.max_steps=1", cwd=tmp_path).returncode == 0
    other = run(*args, "engine.name=fsdp2", cwd=tmp_path)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "resume error: checkpoint" in other.stderr
    assert "engine.name (checkpoint 'ddp', this run 'fsdp2')" in other.stderr
    assert "Supported on resume: any number of ranks" in other.stderr


def test_a_supported_precision_change_resumes(tmp_path, sample_shards):  # noqa: F811
    args = [PRETRAIN, "--config", DEMO, f"run_dir={tmp_path / 'run'}", f"data.shards={sample_shards}", *QUICK,
            "engine.name=fsdp2"]
    assert run(*args, "train.max_steps=1", cwd=tmp_path).returncode == 0
    bf16 = run(*args, "engine.precision=bf16", cwd=tmp_path)
    assert bf16.returncode == 0, bf16.stderr[-2000:]
    assert "resumed at step 1" in bf16.stdout


@pytest.mark.slow
def test_another_zero_stage_is_refused_before_deepspeed_loads_anything(tmp_path, sample_shards):  # noqa: F811
    args = [PRETRAIN, "--config", DEMO, f"run_dir={tmp_path / 'run'}", f"data.shards={sample_shards}", *QUICK,
            "engine.name=deepspeed"]
    env = {"DS_ACCELERATOR": "cpu"}
    first = run(*args, "engine.zero_stage=1", "train.max_steps=1", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    other = run(*args, "engine.zero_stage=2", cwd=tmp_path, env=env)
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "engine.zero_stage (checkpoint 1, this run 2)" in other.stderr
