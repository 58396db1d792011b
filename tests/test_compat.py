"""Files written by an earlier release keep working: shards and checkpoints made by caduceus-dist 0.1.0.

`tests/compat/v0.1.0/` holds what the last commit before the prep/ + data/ split (ffb3e3a) wrote:
the embedded sample sharded with `data_prep/shard_genome.py`, and the step-3 checkpoint of a 6-step run
of a tiny Caduceus-PS with the DDP and the FSDP2 engine, with that run's per-step losses as TensorBoard
recorded them. The command that made them is in tests/compat/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_resume_exact import tensorboard_losses

from caduceus_dist.data.dataset import ShardSplit
from caduceus_dist.prep.sharding import sample_config, shard_genome
from caduceus_dist.shard_format import ShardReader, softmasked, token_ids

REPO = Path(__file__).resolve().parents[1]
COMPAT = REPO / "tests" / "compat" / "v0.1.0"
RUN_OVERRIDES = [
    "data.seq_len=64", "data.tokens_per_step=256", "data.num_workers=0", "data.verify=size",
    "data.curriculum.start_seq_len=32", "data.curriculum.stage_steps=4", "model.d_model=16", "model.n_layer=2",
    "train.max_steps=6", "train.eval_batches=0", "logging.log_every=1", "logging.peak_flops_per_device=1e9",
    "checkpoint.every=3", "checkpoint.keep=0",
]


def test_shards_of_0_1_0_load_and_equal_what_the_sharder_writes_today(tmp_path):
    """Format 1 (0.1.0: zstd, case dropped) and today's format 3 (2-bit bases, soft-mask runs) give the loader the
    same ids; the stored bytes differ exactly at the sample's soft-masked bases."""
    old = load_manifest_splits(COMPAT / "shards")
    shard_genome(sample_config(out=str(tmp_path / "today"), quiet=True))
    today = load_manifest_splits(tmp_path / "today")
    assert (old["format_version"], today["format_version"]) == (1, 3)
    assert old["window"] == today["window"]
    totals = ("windows", "bases", "n_bases", "dropped_windows")
    for split, info in old["splits"].items():
        assert {k: info[k] for k in totals} == {k: today["splits"][split][k] for k in totals}
    flagged = 0
    for split in old["splits"]:
        before = ShardSplit(COMPAT / "shards", split, verify="sha256")
        now = ShardSplit(tmp_path / "today", split, verify="sha256")
        assert len(before.sample_ids) == old["splits"][split]["windows"] > 0
        for sample_id in before.sample_ids:
            np.testing.assert_array_equal(token_ids(before.read_window(int(sample_id))),
                                          token_ids(now.read_window(int(sample_id))))
        for entry_old, entry_now in zip(before.shards, now.shards, strict=True):
            stored_old = ShardReader(entry_old.tar, entry_old.index, 1)
            stored_now = ShardReader(entry_now.tar, entry_now.index, 3)
            for k in range(len(stored_old)):
                raw_old, raw_now = stored_old.read_tokens(k), stored_now.read_tokens(k)
                assert not softmasked(raw_old).any()
                np.testing.assert_array_equal(token_ids(raw_now), raw_old)
                flagged += int(np.count_nonzero(raw_now != raw_old))
    assert flagged == sum(info["softmasked_bases"] for info in today["splits"].values()) == 1  # chrM's one base


def load_manifest_splits(root: Path) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    return {"format_version": manifest["format_version"], "window": manifest["window"], "splits": manifest["splits"]}


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_checkpoints_of_0_1_0_resume_from_the_same_data_position(tmp_path, engine):
    """0.1.0's step-3 checkpoints resume: weights and optimizer as saved, the data stream from the same token
    position. The order of the rest of that epoch is today's crop shuffle (docs/resume.md §5), so the losses
    of steps 4-6 are not 0.1.0's batch for batch (38 targets a batch: ~0.2 nats of noise); their mean is."""
    run_dir, shards = tmp_path / "run", tmp_path / "shards"
    shutil.copytree(COMPAT / f"run_{engine}", run_dir)
    shutil.copytree(COMPAT / "shards", shards)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    result = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "pretrain.py"), "--config", str(REPO / "recipes" / "cpu_demo.yaml"),
         f"run_dir={run_dir}", f"data.shards={shards}", f"engine.name={engine}", *RUN_OVERRIDES],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed at step 3" in result.stdout
    assert "data order (grouped windows" in result.stdout + result.stderr
    (resumed,) = tensorboard_losses(run_dir)
    recorded = {int(step): loss for step, loss in json.loads((COMPAT / "losses.json").read_text())[engine].items()}
    assert sorted(resumed) == [4, 5, 6]
    assert max(resumed.values()) < recorded[1] - 0.25  # far below the untrained 2.78: weights and optimizer restored
    mean_recorded = sum(recorded[step] for step in resumed) / 3
    assert abs(sum(resumed.values()) / 3 - mean_recorded) < 0.15, (resumed, recorded)
    state = torch.load(run_dir / "checkpoints" / "step_000006" / "trainer_state.pt", weights_only=False)
    data = state["data"]
    assert data["version"] == 2 and data["step"] == 6
    assert data["tokens"] == data["sources"]["default"]["tokens"] == 6 * 256  # 256 tokens a step
