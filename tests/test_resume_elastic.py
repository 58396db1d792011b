"""Elastic resume: a checkpoint written by 2 ranks (ZeRO-2, ZeRO-3, FSDP2) continues on 1 and on 4 ranks.

The data cursor is global, so the resumed run must see the same global batches: its first loss (same
parameters, same batch, only the reduction order differs) matches the 2-rank run to float rounding,
the following losses stay within a small tolerance, and the final data cursor is identical.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from test_resume_exact import (
    EVERY,
    MAX_STEPS,
    jobs,  # noqa: F401
    overrides,
    port,
    printed_losses,
    sample_shards,
    straight_run,
    tensorboard_losses,
)

RESUME_FROM = 2 * EVERY


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_two_rank_checkpoint_resumes_on_one_and_four_ranks(engine, tmp_path, tmp_path_factory, jobs):  # noqa: F811
    straight = straight_run(engine, tmp_path_factory)
    shards = sample_shards(tmp_path_factory)
    (straight_tb,) = tensorboard_losses(straight)
    straight_final = torch.load(straight / f"checkpoints/step_{MAX_STEPS:06d}/trainer_state.pt", weights_only=True)
    source = straight / f"checkpoints/step_{RESUME_FROM:06d}"
    for world in (1, 4):
        run_dir = tmp_path / f"world{world}"
        shutil.copytree(source, run_dir / "checkpoints" / source.name)
        (run_dir / "checkpoints" / "latest").write_text(source.name + "\n")
        output = jobs(world, overrides(run_dir, shards, engine), run_dir / "logs", port()).check(timeout=360)
        assert f"resumed at step {RESUME_FROM}" in output
        assert f"world size changed 2 -> {world}" in output
        assert sorted(printed_losses(output)) == list(range(RESUME_FROM + 1, MAX_STEPS + 1))
        (resumed_tb,) = tensorboard_losses(run_dir)
        first = RESUME_FROM + 1
        assert resumed_tb[first] == pytest.approx(straight_tb[first], rel=1e-5, abs=1e-6), (world, resumed_tb)
        for step in range(first + 1, MAX_STEPS + 1):
            assert resumed_tb[step] == pytest.approx(straight_tb[step], rel=2e-3), (world, step, resumed_tb)
        final = torch.load(run_dir / f"checkpoints/step_{MAX_STEPS:06d}/trainer_state.pt", weights_only=True)
        assert final["data"] == straight_final["data"]  # same global position, epoch, stage
        assert final["consumed_tokens"] == straight_final["consumed_tokens"]
