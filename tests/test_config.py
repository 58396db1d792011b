"""JobConfig loading, validation and the pieces derived from it (LR schedule, DeepSpeed JSON)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from caduceus_dist.config import ConfigError, JobConfig, load_job_config, save_resolved
from caduceus_dist.engine.deepspeed_engine import DeepSpeedConfigError, deepspeed_json
from caduceus_dist.optim import OptimizerConfig, ScheduleConfig, lr_at

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_job_config(recipe)
    assert isinstance(cfg, JobConfig)
    assert cfg.model.vocab_size == 12


def test_reference_recipes_match_spec_table_3():
    """Spec 4.2 Table 3 and 4.1: sizes, steps, tokens per step, optimizer, schedule, PS vs Ph."""
    expected = {"131k": (131072, 256, 16, 50_000), "32k": (32768, 256, 8, 10_000), "1k": (1024, 256, 4, 10_000)}
    for size, (seq_len, d_model, n_layer, steps) in expected.items():
        for variant, rcps in (("ps", True), ("ph", False)):
            cfg = load_job_config(REPO / "recipes" / f"{variant}_{size}.yaml")
            assert (cfg.model.d_model, cfg.model.n_layer, cfg.model.rcps) == (d_model, n_layer, rcps)
            assert cfg.train.max_steps == steps and cfg.train.seed == 2222
            assert cfg.data.tokens_per_step == 2**20 and cfg.data.seq_len == seq_len
            assert cfg.data.rc_probability == (0.0 if rcps else 0.5)
            assert (cfg.optim.lr, tuple(cfg.optim.betas), cfg.optim.weight_decay, cfg.optim.grad_clip) == (
                8e-3, (0.9, 0.95), 0.1, 1.0)
            assert cfg.model.residual_in_fp32 is False and cfg.model.fused_add_norm is True


def test_public_override_keys(tmp_path):
    cfg = load_job_config(REPO / "recipes" / "cpu_demo.yaml", [
        f"run_dir={tmp_path}", "train.max_steps=7", "train.seed=5", "engine.name=fsdp2",
        f"data.shards={tmp_path / 'shards'}", "checkpoint.every=3", "checkpoint.keep=1"])
    assert (cfg.run_dir, cfg.train.max_steps, cfg.train.seed, cfg.engine.name) == (str(tmp_path), 7, 5, "fsdp2")
    assert (cfg.data.shards, cfg.checkpoint.every, cfg.checkpoint.keep) == (str(tmp_path / "shards"), 3, 1)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["train.max_stepz=3"], "unknown key 'train.max_stepz'"),
    (["bogus=1"], "unknown key 'bogus'"),
    (["train.max_steps=many"], "wrong type or value for 'train.max_steps'"),
    (["engine.name=megatron"], "engine.name: 'megatron' is not one of"),
    (["engine.name=fsdp2", "engine.precision=fp16"], "engine.precision=fp16 is not supported with engine.name=fsdp2"),
    (["engine.zero_stage=4"], "engine.zero_stage: 4"),
    (["schedule.name=linear"], "schedule.name: 'linear'"),
    (["train.max_steps"], "not of the form key=value"),
    (["checkpoint.every=-1"], "checkpoint.every"),
])
def test_bad_overrides_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_job_config(REPO / "recipes" / "cpu_demo.yaml", overrides)
    assert needle in str(err.value)


def test_overrides_reach_list_items_and_name_what_is_wrong():
    """`data.sources[1].weight=0.5` sets one item of a list of sections (recipes/cpu_mixture.yaml); a missing index,
    an unknown key or a wrong type is one ConfigError naming the override."""
    mixture = REPO / "recipes" / "cpu_mixture.yaml"
    cfg = load_job_config(mixture, ["data.sources[1].weight=0.5", "data.sources[0].shards=/elsewhere",
                                    "data.mixture_schedule[1].start_step=200", "loss.softmask_weight=0.25"])
    assert [(s.name, s.weight) for s in cfg.data.sources] == [("human", 1.0), ("fly", 0.5), ("yeast", 1.0)]
    assert cfg.data.sources[0].shards == "/elsewhere" and cfg.data.mixture_schedule[1].start_step == 200
    assert cfg.loss.softmask_weight == 0.25
    for override, needle in [("data.sources[5].weight=1", "'data.sources' has 3 item(s), so index 5 does not exist"),
                             ("data.sources[0].shardz=x", "Key 'shardz' not in 'SourceConfig'"),
                             ("data.sources[1].weight=abc", "wrong type or value for 'data.sources[1].weight'"),
                             ("train.seed[0]=1", "'train.seed' is not a list")]:
        with pytest.raises(ConfigError) as err:
            load_job_config(mixture, [override])
        assert needle in str(err.value) and f"override '{override}'" in str(err.value)


def test_bad_recipe_file_names_file_and_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 3\n  warmup: 4\n")
    with pytest.raises(ConfigError, match=r"recipe .*r\.yaml: unknown key 'train\.warmup'"):
        load_job_config(recipe)
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips_and_keeps_earlier_versions(tmp_path):
    cfg = load_job_config(REPO / "recipes" / "cpu_demo.yaml", ["train.max_steps=11"])
    path = save_resolved(cfg, tmp_path)
    assert load_job_config(path) == cfg  # the saved file is itself a complete, valid recipe
    changed = load_job_config(path, ["train.max_steps=12"])
    save_resolved(changed, tmp_path)
    kept = [p for p in tmp_path.glob("config.*.yaml")]
    assert len(kept) == 1 and OmegaConf.load(kept[0]).train.max_steps == 11
    assert OmegaConf.load(path).train.max_steps == 12


def test_reference_schedule_values():
    """Spec 4.1: lr(0) = 1e-6, linear to 8e-3 at 10% of S, cosine to 1e-4 at S, 1e-4 after."""
    optim, sched, total = OptimizerConfig(), ScheduleConfig(), 10_000
    warmup = 1000
    assert lr_at(0, optim, sched, total) == pytest.approx(1e-6)
    assert lr_at(500, optim, sched, total) == pytest.approx(1e-6 + 500 * (8e-3 - 1e-6) / warmup)
    assert lr_at(warmup, optim, sched, total) == pytest.approx(8e-3)
    mid = warmup + (total - warmup) // 2
    assert lr_at(mid, optim, sched, total) == pytest.approx(1e-4 + 0.5 * (8e-3 - 1e-4))
    assert lr_at(total - 1, optim, sched, total) == pytest.approx(
        1e-4 + 0.5 * (8e-3 - 1e-4) * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))))
    assert lr_at(total + 5, optim, sched, total) == pytest.approx(1e-4)
    lrs = [lr_at(s, optim, sched, total) for s in range(warmup, total)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))  # monotone decay after warm-up
    # total_steps pins the schedule of the full run when training only a prefix of it
    pinned = ScheduleConfig(total_steps=total)
    assert lr_at(700, optim, pinned, 50) == lr_at(700, optim, sched, total)


def test_deepspeed_json_generated_from_config(tmp_path):
    cfg = load_job_config(REPO / "recipes" / "cpu_demo.yaml",
                          ["engine.name=deepspeed", "engine.zero_stage=3", "engine.precision=bf16", "train.grad_accum=2"])
    ds = deepspeed_json(cfg, world_size=4, micro_batch=3, n_params=10)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 24)
    assert ds["gradient_clipping"] == cfg.optim.grad_clip
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"overlap_comm": True}, "train_batch_size": 24}))
    cfg.engine.deepspeed_config = str(user)
    merged = deepspeed_json(cfg, world_size=4, micro_batch=3, n_params=10)
    assert merged["zero_optimization"]["overlap_comm"] is True and merged["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1e6  # sized to the model, not DeepSpeed's 5e8
    user.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(DeepSpeedConfigError, match="'optimizer' is not allowed"):
        deepspeed_json(cfg, world_size=4, micro_batch=3, n_params=10)
    user.write_text(json.dumps({"gradient_accumulation_steps": 8}))
    with pytest.raises(DeepSpeedConfigError, match="'gradient_accumulation_steps' = 8 contradicts"):
        deepspeed_json(cfg, world_size=4, micro_batch=3, n_params=10)


def _pretrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "recipes" / "pretrain.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["train.grad_acum=2"], "unknown key 'train.grad_acum'"),
    (["train.max_steps=ten"], "wrong type or value for 'train.max_steps'"),
])
def test_entry_point_exits_nonzero_on_config_errors(tmp_path, overrides, needle):
    result = _pretrain("--config", str(REPO / "recipes" / "cpu_demo.yaml"), f"run_dir={tmp_path / 'run'}",
                       *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"config error: override '{overrides[0]}': {needle}" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a job that never started


def test_entry_point_rejects_indivisible_tokens_per_step(tmp_path):
    result = _pretrain("--config", str(REPO / "recipes" / "cpu_demo.yaml"), f"run_dir={tmp_path / 'run'}",
                       "data.tokens_per_step=1000", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "config error" in result.stderr and "tokens_per_step" in result.stderr


def test_entry_point_names_missing_shards_without_a_traceback(tmp_path):
    result = _pretrain("--config", str(REPO / "recipes" / "cpu_demo.yaml"), f"run_dir={tmp_path / 'run'}",
                       f"data.shards={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert result.returncode == 2  # the one contract: what the run was given is wrong, fix it and rerun
    assert "data error:" in result.stderr and str(tmp_path / "nowhere") in result.stderr
    assert "Traceback" not in result.stderr
