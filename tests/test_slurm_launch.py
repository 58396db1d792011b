"""The launchers without a SLURM cluster: the exit-code-keeping torchrun, time limits, start-up
errors, and the Submitit job on this machine (`--local`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from caduceus_dist.launch import _minutes

REPO = Path(__file__).resolve().parents[1]
WORKER = """\
import os, sys
codes = [int(c) for c in os.environ["TEST_EXIT_CODES"].split(",")]
sys.exit(codes[int(os.environ["RANK"])])
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without SLURM's variables (the tests may run inside a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SUBMITIT_"))}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def test_slurm_time_limits_convert_to_minutes():
    assert [_minutes(t) for t in ("30", "1:30", "02:00:00", "1-00", "2-01:30", "0-0:0:5")] == [30, 2, 120, 1440,
                                                                                             2970, 1]
    with pytest.raises(SystemExit, match="--time '1h' is not a SLURM time limit"):
        _minutes("1h")


@pytest.mark.distributed
@pytest.mark.parametrize(("codes", "expected"), [("75,75", 75), ("75,1", 1), ("2,2", 2), ("0,0", 0)])
def test_node_torchrun_keeps_the_requeue_exit_code(tmp_path, free_port, codes, expected):
    """torchrun alone exits 1 for any worker failure; the batch script needs 75 to requeue."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    done = subprocess.run(
        [sys.executable, "-m", "caduceus_dist.launch", "torchrun", "--nnodes=1", "--nproc-per-node=2",
         f"--master-port={free_port}", str(worker)], env=clean_env(TEST_EXIT_CODES=codes), capture_output=True, text=True, timeout=300)
    assert done.returncode == expected, done.stderr[-2000:]


def test_submit_rejects_a_bad_config_before_queueing_anything(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "caduceus_dist.launch", "--config", str(REPO / "recipes" / "cpu_demo.yaml"),
         "--local", "--folder", str(tmp_path / "submitit"), f"run_dir={tmp_path / 'run'}", "train.max_stepz=3"],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "config error" in done.stderr and "train.max_stepz" in done.stderr
    assert not (tmp_path / "submitit").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_local_submitit_job_trains_with_two_tasks(tmp_path):
    """`--local` runs the same job (2 tasks, torch.distributed from the job environment) with
    Submitit's LocalExecutor; `--wait` returns once rank 0 reports the trainer finished."""
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, str(REPO / "data_prep" / "shard_genome.py"), "--out", str(shards), "--quiet"],
                   check=True, cwd=REPO, timeout=300)
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "caduceus_dist.launch", "--config", str(REPO / "recipes" / "cpu_demo.yaml"),
         "--local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10", "--wait",
         f"run_dir={run_dir}", f"data.shards={shards}", "model.d_model=32", "model.n_layer=1",
         "data.seq_len=128", "data.curriculum.start_seq_len=null", "data.tokens_per_step=512", "data.num_workers=0", "train.eval_batches=0", "train.max_steps=4"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=clean_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": finished" in done.stdout
    logs = "".join(p.read_text() for p in sorted((run_dir / "submitit").glob("*_0_log.out")))
    assert "world 2 on cpu" in logs
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000004"
