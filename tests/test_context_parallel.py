"""Context parallelism (engine.cp) with real gloo ranks: the same numbers as one rank holding whole sequences.

Layer level: CP = 2 and 4 against CP = 1 on the same weights and inputs (logits, loss, every parameter
gradient) for PS and Ph, fused and unfused add+norm, with and without activation checkpointing, both CPU
kernel backends, untied directions; PS stays RC-equivariant. Training level: the cpu_demo recipe under
FSDP2 at CP = 2 logs the losses of CP = 1, a SIGKILLed CP = 2 run resumes bitwise, and its checkpoint
resumes at CP = 1 and CP = 4. Bad input: one line at start-up.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rank_scripts import run_on_ranks
from test_resume_exact import (  # noqa: F401  (jobs is a fixture)
    Job,
    checkpoint_contents,
    differences,
    jobs,
    port,
    sample_shards,
    tensorboard_losses,
)

from caduceus_dist.config import load_job_config
from caduceus_dist.data import DataConfig, DataPlanError, SequenceSlice, TrainStream
from caduceus_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CPU_DEMO = REPO / "recipes" / "cpu_demo.yaml"
FP32_RTOL = 1e-5  # the bound: fp32 rounding
BF16_RTOL = 3e-2  # bf16 autocast: CP sums x_proj's partials in fp32, one rank rounds the whole product to bf16

LAYER_CASES = {
    "PS fused": {"rcps": True, "fused_add_norm": True},
    "PS unfused, checkpointed, torch kernels": {"rcps": True, "fused_add_norm": False,
                                               "gradient_checkpointing": True, "backend": "torch"},
    "Ph fused, checkpointed": {"rcps": False, "fused_add_norm": True, "gradient_checkpointing": True},
    "Ph unfused, torch kernels": {"rcps": False, "fused_add_norm": False, "backend": "torch"},
    "Ph untied directions, multiply": {"rcps": False, "bidirectional_weight_tie": False,
                                       "bidirectional_strategy": "ew_multiply"},
    "PS bf16 autocast": {"rcps": True, "fused_add_norm": True, "precision": "bf16"},
}

RANK_SCRIPT = r'''
import json, sys
import torch, torch.distributed as dist, torch.nn.functional as F
from caduceus_dist.engine.context_parallel import ChannelAllToAll, apply_context_parallel
from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
L = 64
mine = slice(rank * L // world, (rank + 1) * L // world)

def gathered(local):
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts, dim=1)

def relative(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()

results = {}
for name, case in json.loads(sys.argv[1]).items():
    case = dict(case)
    bf16 = case.pop("precision", "fp32") == "bf16"
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusConfig(d_model=32, n_layer=2, vocab_size=12, scan_chunk_size=16, **case))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(7, 11, (2, L), generator=generator)
    targets = torch.randint(7, 11, (2, L), generator=generator)
    targets[:, ::5] = 4  # [PAD]: not scored

    def step(ids, targets):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(ids)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=4,
                               reduction="sum")
        loss.backward()
        return logits.detach().float(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    apply_context_parallel(model, None)
    whole_logits, whole_loss, whole_grads = step(ids, targets)
    apply_context_parallel(model, ChannelAllToAll(dist.group.WORLD))
    logits, loss, grads = step(ids[:, mine], targets[:, mine])
    dist.all_reduce(loss)
    for grad in grads.values():
        dist.all_reduce(grad)  # what the data-parallel reduction does over a CP group
    out = {"logits": relative(gathered(logits), whole_logits), "loss": relative(loss, whole_loss),
           "grads": max(relative(grads[n], whole_grads[n]) for n in whole_grads),
           "worst_grad": max(whole_grads, key=lambda n: relative(grads[n], whole_grads[n]))}
    if case.get("rcps"):
        complement = torch.tensor(model.config.padded_complement_map())
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            rc_logits = gathered(model(complement[ids].flip(1)[:, mine]).float())
        out["equivariance"] = relative(rc_logits, gathered(logits).flip(1)[..., complement])
    results[name] = out
print("RESULT " + json.dumps(results))
'''


@pytest.mark.distributed
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_ranks_match_one_rank_logits_loss_and_every_gradient(cp, free_port):
    results = run_on_ranks(RANK_SCRIPT, [json.dumps(LAYER_CASES)], free_port, world=cp, cwd=REPO)
    for name, case in LAYER_CASES.items():
        figures = results[0][name]
        bound = BF16_RTOL if case.get("precision") == "bf16" else FP32_RTOL
        assert figures["logits"] < bound and figures["loss"] < bound, (name, figures)
        assert figures["grads"] < bound, (name, figures)
        if case["rcps"]:  # PS: exact by construction, whatever the sharding (the fp32 bound of the 1-rank test)
            assert figures["equivariance"] < (bound if case.get("precision") == "bf16" else FP32_RTOL), (name, figures)


# ---------------------------------------------------------------------------------------------------
# Training through recipes/pretrain.py

STEPS = 20


def demo_args(run_dir: Path, shards: Path, cp: int, engine: str = "fsdp2") -> list[str]:
    """The cpu_demo recipe for STEPS steps (all at L 128), checkpoints every 5, validation at 10 and 20."""
    return [f"run_dir={run_dir}", f"data.shards={shards}", f"engine.name={engine}", f"engine.cp={cp}",
            f"train.max_steps={STEPS}", "train.eval_every=10", "train.eval_batches=2", "logging.log_every=1",
            "checkpoint.every=5", "checkpoint.keep=0", "logging.peak_flops_per_device=1e9"]


_RUNS: dict[tuple[int, str], Path] = {}


def demo_run(cp: int, tmp_path_factory, engine: str = "fsdp2") -> Path:
    """The uninterrupted run at context-parallel degree `cp` on `cp` processes (once per session)."""
    if (cp, engine) not in _RUNS:
        run_dir = tmp_path_factory.mktemp(f"cp{cp}_{engine}")
        args = demo_args(run_dir, sample_shards(tmp_path_factory), cp, engine)
        Job(cp, args, run_dir / "logs", port()).check(timeout=400)
        _RUNS[cp, engine] = run_dir
    return _RUNS[cp, engine]


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for path in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({event.step: event.value for event in acc.Scalars(tag)})
    return values


def assert_close_losses(actual: dict[int, float], expected: dict[int, float], steps) -> None:
    assert sorted(actual) == list(steps), sorted(actual)
    worst = max(abs(actual[s] - expected[s]) / abs(expected[s]) for s in steps)
    assert worst < FP32_RTOL, {s: (actual[s], expected[s]) for s in steps}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["fsdp2", "ddp"])
def test_cpu_demo_at_cp2_on_two_processes_logs_the_losses_of_one_process(engine, tmp_path_factory):
    one, two = demo_run(1, tmp_path_factory, engine), demo_run(2, tmp_path_factory, engine)
    assert_close_losses(scalars(two, "train/loss"), scalars(one, "train/loss"), range(1, STEPS + 1))
    assert_close_losses(scalars(two, "val/loss"), scalars(one, "val/loss"), (10, 20))
    assert scalars(two, "val/n_targets") == scalars(one, "val/n_targets")  # the same validation targets
    banner = (two / "logs" / "rank0.log").read_text()
    assert "world 2 on cpu" in banner and "context parallel: 2 ranks x 64 positions" in banner


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_at_cp2_then_resume_is_bitwise_the_uninterrupted_run(tmp_path, tmp_path_factory, jobs):  # noqa: F811
    straight = demo_run(2, tmp_path_factory)
    run_dir = tmp_path / "run"
    args = demo_args(run_dir, sample_shards(tmp_path_factory), 2)
    victim = jobs(2, args, run_dir / "logs_1", port())
    victim.wait_for(rf"step\s+12/{STEPS}")
    victim.kill(signal.SIGKILL)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() in {"step_000010", "step_000005"}
    jobs(2, args, run_dir / "logs_2", port()).check(timeout=400)
    assert differences(checkpoint_contents(run_dir / "checkpoints" / f"step_{STEPS:06d}"),
                       checkpoint_contents(straight / "checkpoints" / f"step_{STEPS:06d}")) == []
    resumed = tensorboard_losses(run_dir)[-1]
    expected = tensorboard_losses(straight)[0]
    assert resumed and all(resumed[s] == expected[s] for s in resumed), (resumed, expected)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("cp", [1, 4])
def test_a_cp2_checkpoint_resumes_at_another_cp_degree(cp, tmp_path, tmp_path_factory):
    """The model state does not depend on the CP degree: step 10 of the CP = 2 run continues at CP = cp with
    the losses the CP = 2 run logged (to fp32 rounding), from the same data position."""
    straight = demo_run(2, tmp_path_factory)
    run_dir = tmp_path / "run"
    shutil.copytree(straight / "checkpoints" / "step_000010", run_dir / "checkpoints" / "step_000010")
    (run_dir / "checkpoints" / "latest").write_text("step_000010\n")
    job = Job(cp, demo_args(run_dir, sample_shards(tmp_path_factory), cp), run_dir / "logs", port())
    output = job.check(timeout=400)
    assert "resumed at step 10" in output
    assert_close_losses(scalars(run_dir, "train/loss"), scalars(straight, "train/loss"), range(11, STEPS + 1))


# ---------------------------------------------------------------------------------------------------
# Bad input: one line at start-up


def test_cp_that_does_not_divide_the_world_is_one_line_at_start_up(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "recipes" / "pretrain.py"), "--config", str(CPU_DEMO),
                             f"run_dir={tmp_path / 'run'}", "engine.cp=2"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "config error: engine.cp=2 does not divide the world size 1: the ranks form data-parallel groups of "
        "engine.cp ranks that share sequences; use a divisor of 1, or launch a multiple of engine.cp processes")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, message", [
    (["engine.name=deepspeed", "engine.cp=2"], "engine.cp=2 is not supported with engine.name=deepspeed"),
    (["model.d_model=30", "engine.cp=8"], "engine.cp=8 must divide the Mamba inner width model.d_model x expand = 60"),
    (["engine.cp=0"], "engine.cp must be >= 1, got 0"),
])
def test_impossible_cp_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("+", r"\+")):
        load_job_config(str(CPU_DEMO), override)


def test_a_sequence_too_short_for_the_cp_degree_names_the_stage_and_the_numbers():
    cfg = DataConfig(seq_len=512, tokens_per_step=2048)
    cfg.curriculum.start_seq_len, cfg.curriculum.stage_steps = 2, 10
    windows = {"default": (np.arange(8), 4096)}
    TrainStream(cfg, windows=windows, cp_slice=SequenceSlice(0, 2))  # 2, 4, ..., 512 split over 2 ranks
    with pytest.raises(DataPlanError, match=r"data\.seq_len \(curriculum stage 0\) = 2 is not divisible by "
                                            r"engine\.cp=4: each rank of a context-parallel group"):
        TrainStream(cfg, windows=windows, cp_slice=SequenceSlice(1, 4))


def test_slices_of_a_batch_are_the_whole_batch_in_order():
    batch = {"input_ids": np.arange(24, dtype=np.uint8).reshape(2, 12), "targets": np.arange(24, 48).reshape(2, 12),
             "sample_id": np.array([3, 4])}
    parts = [SequenceSlice(i, 3).apply({k: v.copy() for k, v in batch.items()}) for i in range(3)]
    for key in ("input_ids", "targets"):
        np.testing.assert_array_equal(np.concatenate([part[key] for part in parts], axis=1), batch[key])
        assert all(part[key].flags.c_contiguous and part[key].shape == (2, 4) for part in parts)
    assert all((part["sample_id"] == batch["sample_id"]).all() for part in parts)


def test_ps_1m_plans_one_sequence_per_data_parallel_rank_split_over_eight():
    """recipes/ps_1m.yaml on one 8-GPU node (dp 1 x cp 8) and on two (dp 2: twice the tokens per step)."""
    cfg = load_job_config(str(REPO / "recipes" / "ps_1m.yaml"))
    assert (cfg.engine.name, cfg.engine.cp, cfg.data.seq_len) == ("fsdp2", 8, 2**20)
    windows = {"default": (1000, 2**20)}
    node = TrainStream.planned(cfg.data, windows)
    assert [(s.seq_len, s.global_batch) for s in node.schedule.stages] == [(2**18, 4), (2**19, 2), (2**20, 1)]
    for stage in node.schedule.stages:
        SequenceSlice(7, 8).check(stage.seq_len, "stage")
    two_nodes = load_job_config(str(REPO / "recipes" / "ps_1m.yaml"), ["data.tokens_per_step=2097152"])
    assert TrainStream.planned(two_nodes.data, windows, world_size=2).plan(10**6).micro_batch == 1


def test_windows_of_2_21_bases_feed_a_curriculum_that_grows_to_them_split_over_ranks(shared_data, tmp_path):
    """GRCh37 chr20 (soft-masked by windowmasker) sharded in 2^21-base windows; a curriculum 2^19 -> 2^21 over
    them; at 2^21 the two CP ranks' slices of a step are the halves of the one-rank batch, masks included."""
    fasta = shared_data / "genomes" / "more" / "Hsap_GRCh37_chr20.windowmasker.softmasked.fa.gz"
    subprocess.run([sys.executable, str(REPO / "data_prep" / "shard_genome.py"), "--fasta", str(fasta), "--window",
                    str(2**21), "--valid-fraction", "0.1", "--out", str(tmp_path / "shards"), "--quiet"], check=True)
    cfg = DataConfig(shards=str(tmp_path / "shards"), seq_len=2**21, tokens_per_step=2**21, num_workers=0)
    cfg.curriculum.start_seq_len, cfg.curriculum.stage_steps = 2**19, 2
    whole = TrainStream(cfg)
    assert [s.seq_len for s in whole.schedule.stages] == [2**19, 2**20, 2**21]
    halves = [TrainStream(cfg, cp_slice=SequenceSlice(i, 2)) for i in range(2)]
    expected = next(whole.iterate(4, 5)).micro_batches[0]
    parts = [next(stream.iterate(4, 5)).micro_batches[0] for stream in halves]
    assert expected["input_ids"].shape == (1, 2**21) and parts[0]["input_ids"].shape == (1, 2**20)
    for key in ("input_ids", "targets", "target_softmasked"):
        assert np.array_equal(np.concatenate([p[key].numpy() for p in parts], axis=1), expected[key].numpy()), key
    assert expected["target_softmasked"].any()  # windowmasker's lower case reaches the loss


def test_the_plan_cli_counts_data_parallel_ranks_and_names_the_cp_ranks(capsys):
    from caduceus_dist.data.plan import main as plan_main

    recipe = str(REPO / "recipes" / "ps_1m.yaml")
    assert plan_main(["--config", recipe, "--world-size", "16", "--windows", "default=2900x1048576",
                      "--steps", "999:1000", "data.tokens_per_step=2097152"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["rank"], line["cp_ranks"], line["seq_len"]) for line in lines] == [
        (0, list(range(8)), 2**20), (1, list(range(8, 16)), 2**20)]
    assert plan_main(["--config", recipe, "--world-size", "12", "--windows", "default=2900x1048576"]) == 2
    assert capsys.readouterr().err.strip() == "error: --world-size 12 is not divisible by the recipe's engine.cp=8"
