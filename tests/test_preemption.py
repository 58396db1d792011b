"""Preemption of a 2-rank run by signalling ONE rank: the ranks agree at the next step boundary, save
together, all exit 75 (requeue me), and the same command resumes and finishes the run exactly."""

from __future__ import annotations

import json
import os
import re
import signal

import pytest
from test_resume_exact import (
    MAX_STEPS,
    jobs,  # noqa: F401
    overrides,
    port,
    printed_losses,
    sample_shards,
    straight_run,
    tensorboard_losses,
)

from caduceus_dist.checkpoint.manifest import read_latest
from caduceus_dist.errors import EXIT_PREEMPTED


@pytest.mark.slow
@pytest.mark.distributed
def test_signal_to_one_rank_saves_on_all_and_exits_75_then_resumes(tmp_path, tmp_path_factory, jobs):  # noqa: F811
    straight = straight_run("fsdp2", tmp_path_factory)  # same run, but with checkpoints every 3 steps
    shards = sample_shards(tmp_path_factory)
    run_dir = tmp_path / "run"
    args = overrides(run_dir, shards, "fsdp2", "checkpoint.every=100")  # only preemption and the end save
    # spawned workers (Python 3.14's default) do not inherit the trainer's handlers
    job = jobs(2, [*args, "data.worker_start_method=spawn"], run_dir / "logs_1", port())
    job.wait_for(rf"step\s+2/{MAX_STEPS}")
    os.killpg(job.procs[1].pid, signal.SIGUSR2)  # rank 1 and its workers, as a scheduler signalling one node
    output = job.check(expect=EXIT_PREEMPTED)
    saved = int(re.search(r"preempted: checkpoint saved at step (\d+); exiting with 75", output).group(1))
    assert 2 <= saved < MAX_STEPS
    assert f"rank 1 received SIGUSR2; all ranks save at step {saved}" in job.output(1)
    root = run_dir / "checkpoints"
    assert read_latest(root) == f"step_{saved:06d}"
    manifest = json.loads((root / f"step_{saved:06d}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == saved
    assert {"rng/rank_00000.pt", "rng/rank_00001.pt"} <= set(manifest["files"])  # both ranks took part

    output = jobs(2, args, run_dir / "logs_2", port()).check()
    assert f"resumed at step {saved}" in output
    assert sorted(printed_losses(output)) == list(range(saved + 1, MAX_STEPS + 1))
    (straight_tb,) = tensorboard_losses(straight)
    assert tensorboard_losses(run_dir)[-1] == {s: straight_tb[s] for s in range(saved + 1, MAX_STEPS + 1)}
