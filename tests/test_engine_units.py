"""Engines in one process (a 1-rank gloo group): loss normalisation, optimizer groups, checkpoints, export."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist

from caduceus_dist.config import load_job_config
from caduceus_dist.distributed import init_distributed
from caduceus_dist.engine import build_engine
from caduceus_dist.model import CaduceusForMaskedLM, param_groups

RECIPE = "recipes/cpu_demo.yaml"
TINY = ["model.d_model=16", "model.n_layer=2", "optim.grad_clip=0.5", "schedule.name=constant",
        "schedule.warmup_fraction=0.0"]


@pytest.fixture(scope="module")
def process_group():
    """One 1-rank gloo group for the module (DeepSpeed caches the first group it sees)."""
    with pytest.MonkeyPatch.context() as patch:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)}.items():
            patch.setenv(key, value)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()


def _job(*overrides: str):
    from pathlib import Path

    return load_job_config(Path(__file__).resolve().parents[1] / RECIPE, [*TINY, *overrides])


def _batch(seed: int, rows: int, length: int, mask_prob: float) -> dict:
    """Real-looking MLM micro-batch: ACGT ids, a Bernoulli mask, targets [PAD] (4) elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, 11, (rows, length), generator=gen)
    selected = torch.rand(rows, length, generator=gen) < mask_prob
    targets = torch.where(selected, ids, torch.full_like(ids, 4))
    return {"input_ids": torch.where(selected, torch.full_like(ids, 3), ids), "targets": targets}


def _engine(cfg, seed=0):
    torch.manual_seed(seed)
    ctx = init_distributed(cfg.engine.device)
    return build_engine(cfg, CaduceusForMaskedLM(cfg.model), ctx, micro_batch=2)


def _params(engine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.full_state_dict().items()}


def _reference_step(cfg, model: torch.nn.Module, batches: list[dict], lr: float) -> tuple[float, float]:
    """Plain PyTorch, computed differently: one cross-entropy mean over all targets, clip, AdamW."""
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps)
    logits = torch.cat([model(b["input_ids"]) for b in batches])
    targets = torch.cat([b["targets"] for b in batches])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1), ignore_index=4)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    return float(loss.detach()), float(norm)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2", "deepspeed-0", "deepspeed-2"])
def test_micro_batches_with_unequal_target_counts_equal_one_global_mean(process_group, engine):
    """Loss = mean over the global batch's targets, not a mean of micro-batch means; same clipping norm."""
    engine_name, _, stage = engine.partition("-")
    cfg = _job(f"engine.name={engine_name}", f"engine.zero_stage={stage or 2}", "train.grad_accum=2")
    first, second = _batch(1, 2, 64, 0.05), _batch(2, 2, 64, 0.4)  # ~6 vs ~50 targets
    torch.manual_seed(0)
    reference = CaduceusForMaskedLM(cfg.model)
    engine = _engine(cfg)
    lr = 3e-3
    out = engine.train_step([first, second], lr).reduce()
    ref_loss, ref_norm = _reference_step(cfg, reference, [first, second], lr)
    assert out["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert out["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    assert out["n_targets"] == int((first["targets"] != 4).sum() + (second["targets"] != 4).sum())
    got, want = engine.full_state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    # a mean of per-micro-batch means would differ measurably here
    means = [torch.nn.functional.cross_entropy(CaduceusForMaskedLM(cfg.model)(b["input_ids"]).reshape(-1, 16),
                                               b["targets"].reshape(-1), ignore_index=4) for b in (first, second)]
    assert abs(float(sum(means).detach()) / 2 - ref_loss) > 1e-3


@pytest.mark.parametrize("engine_name", ["ddp", "fsdp2", "deepspeed"])
def test_checkpoint_round_trip_continues_identically(process_group, tmp_path, engine_name):
    cfg = _job(f"engine.name={engine_name}")
    batches = [[_batch(10 + s, 2, 64, 0.15)] for s in range(4)]
    straight = _engine(cfg)
    losses = [straight.train_step(b, 2e-3).reduce()["loss"] for b in batches]
    final = _params(straight)

    first = _engine(cfg)
    for b in batches[:2]:
        first.train_step(b, 2e-3)
    (tmp_path / "ck").mkdir()
    first.save_checkpoint(tmp_path / "ck")

    resumed = _engine(cfg, seed=123)  # different init: everything must come from the checkpoint
    resumed.load_checkpoint(tmp_path / "ck", saved_world_size=1)
    resumed_losses = [resumed.train_step(b, 2e-3).reduce()["loss"] for b in batches[2:]]
    assert resumed_losses == losses[2:]
    for key, value in _params(resumed).items():
        assert torch.equal(value, final[key]), key


@pytest.mark.parametrize("engine_name", ["ddp", "fsdp2", "deepspeed"])
def test_optimizer_holds_reference_weight_decay_groups(process_group, engine_name):
    cfg = _job(f"engine.name={engine_name}")
    engine = _engine(cfg)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    # ZeRO's optimizer holds flat fp32 partitions; its bit16_groups are the module's tensors per group
    module_groups = getattr(engine.optimizer, "bit16_groups", None) or [g["params"] for g in engine.optimizer.param_groups]
    decay = {names[id(p)] for p in module_groups[0]}
    no_decay = {names[id(p)] for p in module_groups[1]}
    assert engine.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert engine.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert all(n.endswith(("bias", "A_log", ".D", "embedding.weight")) for n in no_decay)
    assert any(n.endswith("A_log") for n in no_decay) and any("norm" in n for n in decay)
    assert decay.isdisjoint(no_decay) and len(decay) + len(no_decay) == len(names)
    engine.train_step([_batch(0, 2, 32, 0.15)], 1.234e-3)
    assert [g["lr"] for g in engine.optimizer.param_groups] == [1.234e-3, 1.234e-3]


def test_deepspeed_bf16_export_is_fp32_master_weights(process_group):
    cfg = _job("engine.name=deepspeed", "engine.precision=bf16", "engine.zero_stage=2")
    engine = _engine(cfg)
    engine.train_step([_batch(0, 2, 64, 0.15)], 2e-3)
    exported = engine.full_state_dict()
    module_state = copy.deepcopy(engine.module.state_dict())
    assert exported.keys() == module_state.keys()
    assert all(v.dtype == torch.float32 for v in exported.values() if v.is_floating_point())
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    # fp32 masters round to the bf16 module weights, and carry more precision than them
    key = next(k for k in exported if k.endswith("embedding.weight"))
    torch.testing.assert_close(exported[key].to(torch.bfloat16), module_state[key])
    assert not torch.equal(exported[key], module_state[key].float())


@pytest.mark.parametrize("engine_name", ["ddp", "fsdp2"])
def test_activation_checkpointing_changes_memory_not_math(process_group, engine_name):
    batches = [_batch(5, 2, 64, 0.15), _batch(6, 2, 64, 0.15)]
    results = []
    for checkpointing in ("false", "true"):
        cfg = _job(f"engine.name={engine_name}", "train.grad_accum=2", f"model.gradient_checkpointing={checkpointing}")
        engine = _engine(cfg)
        out = engine.train_step(batches, 2e-3).reduce()
        results.append((out["loss"], out["grad_norm"], _params(engine)))
    (loss_a, norm_a, params_a), (loss_b, norm_b, params_b) = results
    assert loss_a == loss_b and norm_a == pytest.approx(norm_b, rel=1e-6)
    for key in params_a:
        torch.testing.assert_close(params_a[key], params_b[key], rtol=1e-6, atol=1e-7)


def test_deepspeed_fp16_trains_where_the_cpu_has_it_and_is_a_config_error_where_not(process_group):
    """Which case runs depends on the CPU (oneDNN fp16: AVX512-FP16 or AMX); both are checked, none skipped."""
    from deepspeed.accelerator import get_accelerator

    from caduceus_dist.config import ConfigError

    if get_accelerator().is_fp16_supported():
        engine = _engine(_job("engine.name=deepspeed", "engine.precision=fp16"))
        losses = [engine.train_step([_batch(seed, 2, 64, 0.15)], 2e-3).reduce()["loss"] for seed in range(3)]
        assert all(0 < loss < 5 for loss in losses), losses
        return
    with pytest.raises(ConfigError, match=r"engine\.precision=fp16"):
        _engine(_job("engine.name=deepspeed", "engine.precision=fp16"))


@pytest.mark.slow
def test_a_stale_deepspeed_build_lock_left_by_a_killed_process_does_not_hang_the_next_run(tmp_path):
    """DeepSpeed JIT-builds its CPU comm op behind torch's lock file; a process killed meanwhile leaves
    the file behind. The next run must clear it and build, not wait on it forever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), DS_ACCELERATOR="cpu")
    leave_lock = ("import pathlib; from torch.utils.cpp_extension import _get_build_directory as build_dir; "
                  "lock = pathlib.Path(build_dir('deepspeed_shm_comm', False)) / 'lock'; lock.touch(); print(lock)")
    lock = Path(subprocess.run([sys.executable, "-c", leave_lock], env=env, check=True, capture_output=True,
                               text=True).stdout.strip())
    load = "from caduceus_dist.engine.deepspeed_engine import load_cpu_comm_op; load_cpu_comm_op()"
    first = subprocess.run([sys.executable, "-c", load], env=env, check=True, timeout=600, capture_output=True, text=True)
    assert not lock.exists()
    assert list(lock.parent.glob("deepspeed_shm_comm*.so"))
    # the build is announced before its silent minutes, and only when it really happens
    assert "DeepSpeed: compiling its CPU communication op once for this machine" in first.stderr
    again = subprocess.run([sys.executable, "-c", load], env=env, check=True, timeout=600, capture_output=True, text=True)
    assert "compiling" not in again.stderr
