"""The training entry point end to end: quickstart sharding, curriculum, metrics read back from TensorBoard,
validation metrics checked against an independent evaluation of the saved weights."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from ddp_checkpoint import read_ddp_checkpoint
from test_engine_distributed import pretrain_cmd, read_scalars, run_job

from caduceus_dist.config import load_job_config
from caduceus_dist.optim import lr_at

REPO = Path(__file__).resolve().parents[1]

STEPS = 8
TRAIN_TAGS = {
    "train/loss", "train/accuracy", "train/grad_norm", "train/lr", "train/n_targets", "perf/tokens_per_s",
    "perf/tokens_per_s_per_device", "perf/mfu", "perf/step_time_s", "perf/data_wait_fraction",
    "perf/peak_memory_gib", "data/seq_len", "data/stage", "data/global_batch", "data/consumed_tokens",
    "data/cursor_tokens", "data/epochs/default",
}
VAL_TAGS = {"val/loss", "val/perplexity", "val/bits_per_base", "val/accuracy", "val/n_targets", "val/loss_uppercase",
            "val/bits_per_base_uppercase"}
OVERRIDES = [
    "model.d_model=16", "model.n_layer=2", "data.seq_len=128", "data.tokens_per_step=1024",
    "data.curriculum.start_seq_len=64", "data.curriculum.stage_steps=4", "data.num_workers=1",
    "data.eval_batch_size=6", f"train.max_steps={STEPS}", "train.eval_every=4", "train.eval_batches=3",
    "checkpoint.every=4", "logging.log_every=2", "logging.peak_flops_per_device=2e9",
]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The README command with small overrides, from a fresh directory: it must shard the sample itself."""
    cwd = tmp_path_factory.mktemp("quickstart")
    result = run_job(pretrain_cmd("python", 0, "run_dir=runs/demo", *OVERRIDES), cwd=cwd)
    assert result.returncode == 0, result.stdout[-6000:]
    return cwd, cwd / "runs" / "demo", result.stdout


@pytest.mark.slow
def test_quickstart_shards_the_sample_and_writes_the_run(quickstart_run):
    cwd, run_dir, log = quickstart_run
    assert "sharding the embedded sample genome" in log
    assert (cwd / "data" / "shards" / "sample" / "manifest.json").exists()
    saved = load_job_config(run_dir / "config.yaml")  # the resolved config is itself a valid recipe
    assert saved.train.max_steps == STEPS and saved.data.seed == saved.train.seed == 2222
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_000004", "step_000008"]


@pytest.mark.slow
def test_tensorboard_holds_every_metric_with_consistent_values(quickstart_run):
    _, run_dir, log = quickstart_run
    scalars = read_scalars(run_dir)
    assert set(scalars) >= TRAIN_TAGS | VAL_TAGS, sorted(TRAIN_TAGS | VAL_TAGS - set(scalars))
    value = {tag: dict(points) for tag, points in scalars.items()}
    reported = [1, 2, 4, 6, 8]  # step 1, every logging.log_every=2 steps, the last step
    assert sorted(value["train/loss"]) == reported
    cfg = load_job_config(run_dir / "config.yaml")
    from caduceus_dist.model import flops_per_token

    for step in reported:
        # curriculum: 64 for steps 0-3, then 128, tokens per step held at 1024
        seq_len = 64 if step <= 4 else 128
        assert (value["data/seq_len"][step], value["data/stage"][step]) == (seq_len, 0 if step <= 4 else 1)
        assert value["data/global_batch"][step] == 1024 / seq_len
        assert value["data/consumed_tokens"][step] == value["data/cursor_tokens"][step] == 1024 * step
        assert value["train/lr"][step] == pytest.approx(lr_at(step - 1, cfg.optim, cfg.schedule, STEPS))
        tok_s = value["perf/tokens_per_s"][step]
        assert tok_s == pytest.approx(1024 / value["perf/step_time_s"][step], rel=1e-5)
        assert value["perf/tokens_per_s_per_device"][step] == pytest.approx(tok_s, rel=1e-6)  # one rank
        assert value["perf/mfu"][step] == pytest.approx(flops_per_token(cfg.model, seq_len) * tok_s / 2e9, rel=1e-5)
        assert 0 <= value["perf/data_wait_fraction"][step] < 1
        assert value["perf/peak_memory_gib"][step] > 0
        assert value["train/grad_norm"][step] > 0 and 0 <= value["train/accuracy"][step] <= 1
    assert sorted(value["val/loss"]) == [4, 8]
    for step in (4, 8):
        loss = value["val/loss"][step]
        assert value["val/perplexity"][step] == pytest.approx(math.exp(loss), rel=1e-5)
        assert value["val/bits_per_base"][step] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert {"checkpoint/blocking_s", "checkpoint/bytes"} <= set(scalars)
    assert sorted(value["checkpoint/bytes"]) == [4, 8]
    # the console line carries the same numbers
    line = next(line for line in log.splitlines() if line.startswith("step      8/8"))
    for field in ("loss", "lr", "gnorm", "tok/s", "mfu", "L 128 stage 1", "mem", "ms/step", "data wait", "tokens"):
        assert field in line
    assert f"loss {value['train/loss'][8]:.4f}" in line


@pytest.mark.slow
def test_validation_metrics_match_an_independent_evaluation(quickstart_run):
    """Reload the final weights into a bare model and recompute val loss/accuracy with plain PyTorch."""
    from caduceus_dist.data import build_eval_loader
    from caduceus_dist.model import CaduceusForMaskedLM

    cwd, run_dir, _ = quickstart_run
    cfg = load_job_config(run_dir / "config.yaml", [f"data.shards={cwd / 'data' / 'shards' / 'sample'}"])
    model = CaduceusForMaskedLM(cfg.model)
    loaded = model.load_state_dict(read_ddp_checkpoint(run_dir / "checkpoints" / "step_000008")["model"], strict=False)
    unique = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    assert set(loaded.missing_keys) == set(model.state_dict()) - unique  # only the names of tied weights
    logits, targets = [], []
    with torch.no_grad():
        for batch in build_eval_loader(cfg.data, "valid", 0, 1, cfg.train.eval_batches, train_seed=cfg.train.seed):
            logits.append(model(batch["input_ids"]).reshape(-1, 16))
            targets.append(batch["targets"].reshape(-1))
    logits, targets = torch.cat(logits), torch.cat(targets)
    keep = targets != 4
    loss = torch.nn.functional.cross_entropy(logits[keep], targets[keep]).item()
    accuracy = (logits[keep].argmax(-1) == targets[keep]).float().mean().item()
    value = {tag: dict(points) for tag, points in read_scalars(run_dir).items()}
    assert value["val/loss"][8] == pytest.approx(loss, rel=1e-5)
    assert value["val/accuracy"][8] == pytest.approx(accuracy, rel=1e-6)
    assert value["val/n_targets"][8] == int(keep.sum())


@pytest.mark.slow
def test_cpu_mixture_recipe_validates_each_genome_and_every_loss_falls(tmp_path):
    """recipes/cpu_mixture.yaml from a fresh directory: it shards the embedded collection itself, and TensorBoard
    holds each genome's validation loss (falling from the first evaluation to the last), their weighted total
    (equal weights in the first phase), the upper-case loss, and each genome's progress in epochs."""
    command = [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--config", str(REPO / "recipes" / "cpu_mixture.yaml"),
               "run_dir=runs/mix", "train.max_steps=60", "train.eval_every=10", "checkpoint.every=60",
               "data.curriculum.stage_steps=20"]
    result = run_job(command, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    assert "sharding the embedded three-species collection" in result.stdout
    value = {tag: dict(points) for tag, points in read_scalars(tmp_path / "runs" / "mix").items()}
    genomes = ("human", "fly", "yeast")
    for name in genomes:
        losses = value[f"val/{name}/loss"]
        assert sorted(losses) == [10, 20, 30, 40, 50, 60]
        assert losses[60] < losses[10], (name, losses)
        assert value[f"val/{name}/bits_per_base"][60] == pytest.approx(losses[60] / math.log(2), rel=1e-5)
        assert value[f"data/epochs/{name}"][60] > 0
    for step in (10, 60):
        for key in ("loss", "loss_uppercase"):
            mean = sum(value[f"val/{name}/{key}"][step] for name in genomes) / 3
            assert value[f"val/{key}"][step] == pytest.approx(mean, rel=1e-5)
    assert value["val/human/loss_uppercase"][60] != value["val/human/loss"][60]  # 41% of its bases are lower case
    line = next(line for line in result.stdout.splitlines() if line.startswith("eval     60"))
    for name in genomes:
        assert f"| {name} {value[f'val/{name}/bits_per_base'][60]:.4f}" in line


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_exported_weights(quickstart_run, tmp_path):
    """Context extension's first step: a new run starts from another run's exported weights (optimizer, schedule
    and data fresh). After one AdamW step at LR 1e-6 its weights are within 1e-5 of the export's."""
    from caduceus_dist.export import export, load_model
    from caduceus_dist.model import CaduceusForMaskedLM

    cwd, run_dir, _ = quickstart_run
    exported = export(run_dir, tmp_path / "hf")
    one_step = ["train.max_steps=1", "checkpoint.every=1", "train.eval_batches=0", "optim.lr=1e-6"]
    result = run_job(pretrain_cmd("python", 0, f"run_dir={tmp_path / 'extended'}", *OVERRIDES, *one_step,
                                  f"train.init_from={exported}"), cwd=cwd)
    assert result.returncode == 0, result.stdout[-4000:]
    assert f"starting from the weights of {exported} (train.init_from)" in result.stdout
    start = CaduceusForMaskedLM.from_pretrained(exported).state_dict()
    after, _ = load_model(tmp_path / "extended")
    fresh = CaduceusForMaskedLM(load_job_config(run_dir / "config.yaml").model).state_dict()
    moved = max((after.state_dict()[k] - start[k]).abs().max().item() for k in start)
    from_init = max((after.state_dict()[k] - fresh[k]).abs().max().item() for k in start)
    assert moved < 1e-5 < 1e-3 < from_init, (moved, from_init)

    mismatched = run_job(pretrain_cmd("python", 0, f"run_dir={tmp_path / 'wrong'}", *OVERRIDES, *one_step,
                                      "model.d_model=32", f"train.init_from={exported}"), cwd=cwd)
    assert mismatched.returncode == 2 and "Traceback" not in mismatched.stdout
    last = mismatched.stdout.strip().splitlines()[-1]
    assert last.startswith(f"config error: train.init_from: {exported}/model.safetensors: the weights do not match"), last
    assert "shape mismatches" in last and not (tmp_path / "wrong").exists()
