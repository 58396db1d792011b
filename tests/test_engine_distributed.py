"""Real multi-process training through the real launchers (deepspeed, torchrun) on real hg38 shards.

Every distributed run is compared with a single-process run of the same global batch: 2 ranks x 1
micro-batch against 1 rank x 2 micro-batches, so these tests also prove gradient-accumulation
equivalence end to end. Losses are read back from the runs' TensorBoard files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rank_scripts import run_on_ranks

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
STEPS = 6
# A tiny PS model on 128-base crops of the sample's 8 kb windows; constant LR so the loss moves at once.
TINY = [
    "model.d_model=16", "model.n_layer=2", "data.seq_len=128", "data.tokens_per_step=1024",
    "data.curriculum.start_seq_len=null", "data.num_workers=0", "schedule.name=constant",
    "schedule.warmup_fraction=0.0", "optim.lr=5e-3", f"train.max_steps={STEPS}", "train.eval_batches=3", f"train.eval_every={STEPS}",
    "data.eval_batch_size=5",
    "checkpoint.every=0", "logging.log_every=1", "logging.peak_flops_per_device=1e9",
]
# Ranks sum their gradients in a different order than one process does; fp32 rounding then grows
# through Adam's normalisation over a few steps. Measured differences are ~1e-6; allow 2e-4.
LOSS_RTOL = 2e-4


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """The embedded real-hg38 sample, sharded once per session by the sharder's library."""
    from caduceus_dist.prep.sharding import sample_config, shard_genome

    out = tmp_path_factory.mktemp("shards") / "sample"
    shard_genome(sample_config(out=str(out)))
    return out


def run_job(cmd: list[str], cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    """Run a launcher in its own session; on timeout kill the whole process group (launcher + ranks)."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:6])}... timed out after {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def pretrain_cmd(launcher: str, port: int, *args: str) -> list[str]:
    script = [str(REPO / "recipes" / "pretrain.py"), "--config", str(REPO / "recipes" / "cpu_demo.yaml"), *args]
    if launcher == "python":
        return [sys.executable, *script]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", *script]
    if launcher == "deepspeed":
        return [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), *script]
    raise ValueError(launcher)


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, read back with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train(tmp_path: Path, name: str, launcher: str, port: int, shards: Path, *overrides: str):
    run_dir = tmp_path / name
    result = run_job(pretrain_cmd(launcher, port, f"run_dir={run_dir}", f"data.shards={shards}", *TINY, *overrides),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:]
    return read_scalars(run_dir), result.stdout


@pytest.fixture(scope="module")
def single_process_reference(sample_shards, tmp_path_factory):
    """1 rank x 2 micro-batches, plain PyTorch: what every 2-rank run must reproduce."""
    tmp = tmp_path_factory.mktemp("reference")
    scalars, _ = train(tmp, "ref", "python", 0, sample_shards, "engine.name=ddp", "train.grad_accum=2")
    return scalars


def losses(scalars) -> list[float]:
    return [value for _, value in scalars["train/loss"]]


def assert_matches_reference(scalars, reference, rtol=LOSS_RTOL):
    got, want = losses(scalars), losses(reference)
    assert len(got) == len(want) == STEPS
    assert got == pytest.approx(want, rel=rtol)
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    assert got[-1] < got[0] - 0.3  # it learns: from ~ln 16 towards the base composition and beyond
    # the same global batch: same number of masked targets per step
    assert [v for _, v in scalars["train/n_targets"]] == [v for _, v in reference["train/n_targets"]]
    # validation sums losses and counts over uneven (possibly empty) rank slices: same global result
    assert scalars["val/n_targets"] == reference["val/n_targets"]
    assert scalars["val/loss"][-1][1] == pytest.approx(reference["val/loss"][-1][1], rel=rtol)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_two_ranks_match_single_process(stage, sample_shards, single_process_reference, tmp_path,
                                                        free_port):
    scalars, log = train(tmp_path, f"zero{stage}", "deepspeed", free_port, sample_shards,
                         "engine.name=deepspeed", f"engine.zero_stage={stage}", "train.grad_accum=1")
    assert f"ZeRO-{stage}" in log and "world 2" in log
    assert_matches_reference(scalars, single_process_reference)
    # the end-of-run checkpoint holds DeepSpeed's native per-rank ZeRO files
    ckpt = next((tmp_path / f"zero{stage}" / "checkpoints").glob("step_*"))
    assert len(list((ckpt / "deepspeed").glob("*optim_states.pt"))) == 2


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_ranks_match_single_process(sample_shards, single_process_reference, tmp_path, free_port):
    scalars, log = train(tmp_path, "fsdp2", "torchrun", free_port, sample_shards, "engine.name=fsdp2",
                         "train.grad_accum=1")
    assert "engine fsdp2" in log and "world 2" in log
    assert_matches_reference(scalars, single_process_reference)
    ckpt = next((tmp_path / "fsdp2" / "checkpoints").glob("step_*"))
    assert (ckpt / "dcp" / ".metadata").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_ranks_times_one_micro_batch_equals_one_rank_times_two(sample_shards, single_process_reference,
                                                                       tmp_path, free_port):
    scalars, log = train(tmp_path, "ddp2", "torchrun", free_port, sample_shards, "engine.name=ddp",
                         "train.grad_accum=1")
    assert "micro 4 x accum 1 x 2 data-parallel ranks" in log
    assert_matches_reference(scalars, single_process_reference)
    # every rank-reduced metric is the global one: the per-step grad norms agree too
    got = [v for _, v in scalars["train/grad_norm"]]
    want = [v for _, v in single_process_reference["train/grad_norm"]]
    assert got == pytest.approx(want, rel=LOSS_RTOL)


DDP_IO_SCRIPT = """
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.checkpoint import filesystem
sys.path.insert(0, sys.argv[2])
from test_engine_units import _batch, _job
from caduceus_dist.distributed import init_distributed
from caduceus_dist.engine import build_engine
from caduceus_dist.model import CaduceusForMaskedLM

import caduceus_dist.engine.ddp as ddp_engine
ddp_engine.CHUNK_ELEMENTS = 4096  # this tiny model in several chunks, as a real one is
reads, real_read = [], filesystem.FileSystemReader.read_data
filesystem.FileSystemReader.read_data = lambda self, plan, planner: (reads.append(len(plan.items)),
                                                                    real_read(self, plan, planner))[1]
cfg = _job("engine.name=ddp")
ctx = init_distributed("cpu")
torch.manual_seed(0)
engine = build_engine(cfg, CaduceusForMaskedLM(cfg.model), ctx, micro_batch=2)
for k in range(2):
    engine.train_step([_batch(k, 2, 64, 0.15)], 2e-3)
engine.save_checkpoint(sys.argv[1])
dist.barrier()
torch.manual_seed(ctx.rank + 7)  # other weights on every rank: only the restore can make them equal
fresh = build_engine(cfg, CaduceusForMaskedLM(cfg.model), ctx, micro_batch=2)
fresh.load_checkpoint(sys.argv[1], 2)
same = all(torch.equal(a, b) for a, b in zip(engine.full_state_dict().values(), fresh.full_state_dict().values()))
losses = [e.train_step([_batch(9, 2, 64, 0.15)], 2e-3).reduce()["loss"] for e in (engine, fresh)]
print("RESULT " + json.dumps({"reads": reads, "same_weights": same, "losses": losses}), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.distributed
def test_ddp_checkpoint_is_written_by_all_ranks_and_read_once(tmp_path, free_port):
    """DDP replicas: the state is packed into fixed-size chunks that DCP spreads over the ranks, so the
    ranks share the writing; at resume rank 0 reads and broadcasts (before, rank 0 wrote the whole file
    and every rank read all of it)."""
    results = run_on_ranks(DDP_IO_SCRIPT, [str(tmp_path / "ckpt"), str(REPO / "tests")], free_port, cwd=REPO)
    files = {p.name: p.stat().st_size for p in (tmp_path / "ckpt" / "dcp").glob("*.distcp")}
    total = sum(files.values())
    assert sorted(files) == ["__0_0.distcp", "__1_0.distcp"] and min(files.values()) > total / 4, files
    assert results[0]["reads"] and not results[1]["reads"]  # rank 0 read, rank 1 received
    for result in results:
        assert result["same_weights"] and result["losses"][0] == result["losses"][1]
