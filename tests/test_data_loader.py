"""TrainStream / EvalStream: exact and elastic resume, coverage, ranks x workers, epochs, curriculum, plan CLI.

Real shard files (written by the project's ShardWriter from real hg38 sequence) and real DataLoader
worker processes. Crops are identified by (epoch, sample id, offset, length); "coverage" tests
count every stored base of the split.
"""

from __future__ import annotations

import gzip
import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_fixtures import all_windows, write_dataset

from caduceus_dist.data import CurriculumConfig, DataConfig, StageConfig, TrainStream, build_eval_loader
from caduceus_dist.data.curriculum import DataPlanError
from caduceus_dist.data.plan import main as plan_main
from caduceus_dist.model.tokenizer import COMPLEMENT_IDS, PAD_ID, CaduceusTokenizer

WINDOW = 1024
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 train windows in uneven shards (7, 13, 20) = 160 crops of 256; 37-window variant; valid split."""
    root = tmp_path_factory.mktemp("shards")
    write_dataset(root, WINDOW, {"train": [7, 13, 20], "valid": [3, 2], "test": [2]})
    return root


@pytest.fixture(scope="module")
def odd_shards(tmp_path_factory) -> Path:
    """37 windows: 148 crops of 256, so steps of 16 crops straddle epoch boundaries."""
    root = tmp_path_factory.mktemp("odd")
    write_dataset(root, WINDOW, {"train": [5, 1, 31]})
    return root


def config(root: Path, **kw) -> DataConfig:
    base = dict(shards=str(root), seq_len=256, tokens_per_step=256 * 16, num_workers=2, rc_probability=0.5, seed=7)
    base.update(kw)
    return DataConfig(**base)


def crops_of(step_batch) -> list[tuple[int, int, int, int]]:
    out = []
    for micro in step_batch.micro_batches:
        length = micro["input_ids"].shape[1]
        out += list(zip(micro["epoch"].tolist(), micro["sample_id"].tolist(), micro["crop_offset"].tolist(),
                        [length] * len(micro["epoch"]), strict=True))
    return out


def global_crops(cfg: DataConfig, world_size: int, grad_accum: int, start: int, stop: int,
                 state: dict | None = None) -> tuple[list[list[tuple]], dict]:
    """Per step, the crops of all ranks (rank order), by really iterating every rank's stream."""
    per_step: list[list[tuple]] = [[] for _ in range(start, stop)]
    last_state = None
    for rank in range(world_size):
        stream = TrainStream(cfg, rank=rank, world_size=world_size, grad_accum=grad_accum)
        if state is not None:
            stream.load_state_dict(state)
        for sb in stream.iterate(start, stop):
            per_step[sb.step - start] += crops_of(sb)
        if rank == 0:
            last_state = stream.state_dict()
    return per_step, last_state


def assert_each_base_once(crops: list[tuple], windows: int, epoch: int = 0) -> None:
    coverage = np.zeros((windows, WINDOW), dtype=np.int64)
    for ep, sample, offset, length in crops:
        if ep == epoch:
            coverage[sample, offset:offset + length] += 1
    assert coverage.min() == 1 and coverage.max() == 1, (coverage.min(), coverage.max())


BATCH_KEYS = ("input_ids", "targets", "target_softmasked", "source", "sample_id", "crop_offset", "strand", "epoch")


def resume_after(cfg: DataConfig, rank: int, world_size: int, grad_accum: int, done: int, stop: int):
    """(state, replayed StepBatches, uninterrupted StepBatches) for a stream interrupted after `done` steps
    with its workers' prefetched batches unconsumed, then resumed from its state to `stop`."""
    reference = list(TrainStream(cfg, rank, world_size, grad_accum).iterate(0, stop))
    interrupted = TrainStream(cfg, rank, world_size, grad_accum)
    it = interrupted.iterate(0, stop)
    for _ in range(done):
        next(it)
    state = interrupted.state_dict()
    it.close()
    resumed = TrainStream(cfg, rank, world_size, grad_accum)
    resumed.load_state_dict(state)
    replay = list(resumed.iterate(stop_step=stop))
    assert [sb.step for sb in replay] == list(range(done, stop))
    for got, want in zip(replay, reference[done:], strict=True):
        for a, b in zip(got.micro_batches, want.micro_batches, strict=True):
            for key in BATCH_KEYS:
                assert torch.equal(a[key], b[key]), key
    assert replay[-1].state == resumed.state_dict()
    return state


def test_exact_resume_with_prefetched_batches(shards):
    cfg = config(shards, prefetch_factor=4)  # 2 workers x prefetch 4 = up to 8 more micro-batches built
    state = resume_after(cfg, 0, 2, 2, done=3, stop=8)
    assert state["step"] == 3 and state["tokens"] == 3 * cfg.tokens_per_step


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 4)])
def test_elastic_resume_continues_the_same_global_sequence(shards, before, after):
    cfg = config(shards)
    steps = 12  # 10 steps = one epoch of 160 crops; two more go into epoch 1
    uninterrupted, _ = global_crops(cfg, 1, 1, 0, steps)
    first, state = global_crops(cfg, before, 2, 0, 4)
    second, _ = global_crops(cfg, after, 1 if after == 4 else 2, 4, steps, state=state)
    resumed = first + second
    for got, want in zip(resumed, uninterrupted, strict=True):
        assert Counter(got) == Counter(want)  # same crops in each step, whatever the rank layout
    flat = [c for step in resumed for c in step]
    epoch0 = [c for c in flat if c[0] == 0]
    assert len(epoch0) == len(set(epoch0)) == 160  # nothing repeated or skipped within the epoch
    assert_each_base_once(flat, windows=40)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_ranks_and_workers_partition_each_step(shards):
    cfg = config(shards, num_workers=3)
    per_step, _ = global_crops(cfg, 4, 2, 0, 10)
    single = TrainStream(config(shards, num_workers=0), 0, 1, 1)
    for step, crops in enumerate(per_step):
        assert len(crops) == 16
        assert crops == crops_of(next(iter(single.iterate(step, step + 1))))  # rank-major slices of one order
    assert_each_base_once([c for s in per_step for c in s], windows=40)


def test_content_is_the_stored_bases(shards):
    """With masking off, every row is exactly its stored crop (reverse-complemented when strand = 1)."""
    stored = all_windows(shards, "train")
    cfg = config(shards, mlm_probability=0.0, rc_probability=0.5)
    strands = []
    for sb in TrainStream(cfg, 1, 2, 1).iterate(0, 3):
        batch = sb.micro_batches[0]
        for row, sample, offset, strand in zip(batch["input_ids"], batch["sample_id"], batch["crop_offset"],
                                               batch["strand"], strict=True):
            crop = stored[int(sample)][int(offset):int(offset) + 256]
            want = COMPLEMENT_IDS[crop[::-1]] if strand else crop
            assert np.array_equal(row.numpy(), want.astype(np.int64))
            strands.append(int(strand))
        assert bool((batch["targets"] == PAD_ID).all())
    assert 0 < sum(strands) < len(strands)


def test_epoch_boundary_same_step_on_every_rank_with_uneven_shards(odd_shards):
    cfg = config(odd_shards)
    per_step, _ = global_crops(cfg, 2, 1, 0, 20)  # 148 crops per epoch, 16 per step
    steps_with_two_epochs = [s for s, crops in enumerate(per_step) if len({c[0] for c in crops}) == 2]
    assert steps_with_two_epochs == [9, 18]  # 148 / 16 = 9.25: step 9 ends epoch 0 and starts epoch 1
    assert Counter(c[0] for c in per_step[9]) == {0: 4, 1: 12}  # no drop, no padding: the step is full
    flat = [c for s in per_step for c in s]
    for epoch in (0, 1):
        crops = [c for c in flat if c[0] == epoch]
        assert len(crops) == len(set(crops)) == 148
        assert_each_base_once(flat, windows=37, epoch=epoch)
    epoch0 = [c[1:] for c in flat if c[0] == 0]
    epoch1 = [c[1:] for c in flat if c[0] == 1]
    assert epoch0 != epoch1  # reshuffled per epoch


def _curriculum_cfg(shards) -> DataConfig:
    stages = [StageConfig(seq_len=256, steps=3), StageConfig(seq_len=512, steps=3), StageConfig(seq_len=1024)]
    return config(shards, seq_len=1024, curriculum=CurriculumConfig(stages=stages))


def test_curriculum_stage_change_keeps_the_token_position_and_the_next_epoch_whole(shards):
    """A stage starts the order of its length at the same token position: within each stage no crop repeats,
    the epoch in which stages change holds exactly one epoch of tokens, and the next epoch covers every base once."""
    cfg = _curriculum_cfg(shards)
    stream = TrainStream(cfg, 0, 2, 1)
    assert [stream.plan(s).seq_len for s in (0, 2, 3, 5, 6, 40)] == [256, 256, 512, 512, 1024, 1024]
    assert {stream.plan(s).tokens_per_step for s in range(12)} == {4096}
    assert [stream.plan(s).micro_batch for s in (0, 3, 6)] == [8, 4, 2]
    per_step, _ = global_crops(cfg, 2, 1, 0, 20)  # 40 windows x 1024 = 10 steps of 4096 tokens per epoch
    flat = [c for s in per_step for c in s]
    for length in (256, 512, 1024):
        crops = [c for c in flat if c[3] == length]
        assert len(crops) == len(set(crops))
    assert sum(c[3] for c in flat if c[0] == 0) == 40 * 1024
    assert_each_base_once(flat, windows=40, epoch=1)

    # resume inside stage 0 at another world size: the rest of the schedule is unchanged
    first, state = global_crops(cfg, 2, 1, 0, 2)
    second, _ = global_crops(cfg, 4, 1, 2, 20, state=state)
    assert [Counter(s) for s in first + second] == [Counter(s) for s in per_step]


def test_generated_curriculum_hold_batch_mode(shards):
    cur = CurriculumConfig(start_seq_len=256, stage_steps=2, hold="batch", global_batch=4)
    cfg = config(shards, seq_len=1024, curriculum=cur)
    stream = TrainStream(cfg, 0, 2, 1)
    plans = [stream.plan(s) for s in range(8)]
    assert [p.seq_len for p in plans] == [256, 256, 512, 512, 1024, 1024, 1024, 1024]
    assert {p.global_batch for p in plans} == {4}
    assert [p.tokens_per_step for p in plans[:5]] == [1024, 1024, 2048, 2048, 4096]
    steps = 4 + (40 * 1024 - 6 * 1024) // 4096  # 2 + 2 short steps, then whole 4096-token steps; 40 windows
    per_step, _ = global_crops(cfg, 2, 1, 0, steps + 1)
    flat = [c for s in per_step for c in s]
    assert [c[3] for c in flat[:8]] == [256] * 8 and sum(c[3] for c in flat if c[0] == 0) == 40 * 1024


def test_hold_batch_resume_with_another_global_batch_reaches_later_stages(shards):
    """Saved at step 1 (stage 0, 256) with global batch 4, resumed with 2: the resumed stream reaches the
    1024 stage at token 3584, not a whole 1024 row; that stage must start at the next row, not crash."""
    def hold_batch(global_batch: int) -> DataConfig:
        cur = CurriculumConfig(start_seq_len=256, stage_steps=2, hold="batch", global_batch=global_batch)
        return config(shards, seq_len=1024, curriculum=cur)

    stream = TrainStream(hold_batch(4), 0, 1, 1)
    list(stream.iterate(0, 1))
    state = stream.state_dict()
    per_step, _ = global_crops(hold_batch(2), 1, 1, 1, 8, state=state)
    assert [crop[3] for step in per_step for crop in step] == [256] * 2 + [512] * 4 + [1024] * 8
    assert all(offset % length == 0 for step in per_step for _, _, offset, length in step)
    resumed = TrainStream(hold_batch(2), 0, 1, 1)
    resumed.load_state_dict(state)
    assert resumed.mixture.positions(1)[0] == state["tokens"] == state["sources"]["default"]["tokens"] == 4 * 256
    assert resumed.mixture.positions(4)[0] == 4096  # 3584 rounded up to a 1024 crop: less than one crop skipped
    before, _ = global_crops(hold_batch(4), 1, 1, 0, 1)
    seen = [c for s in before + per_step for c in s]
    assert len(seen) == len(set(seen))  # nothing repeated across the resume


def test_tokens_per_step_change_rebases_the_cursor(shards):
    cfg = config(shards)
    stream = TrainStream(cfg, 0, 1, 1)
    list(stream.iterate(0, 3))
    state = stream.state_dict()
    bigger = TrainStream(config(shards, tokens_per_step=256 * 32), 0, 2, 1)
    bigger.load_state_dict(state)
    assert bigger.mixture.positions(3)[0] == state["tokens"] and bigger.state_dict()["tokens"] == state["tokens"]
    with pytest.raises(DataPlanError, match="step 2 precedes step 3, where this stream was resumed"):
        bigger.rows(2, 0, 0)
    per_step, _ = global_crops(config(shards, tokens_per_step=256 * 32), 2, 1, 3, 4, state=state)
    before, _ = global_crops(cfg, 1, 1, 0, 3)
    epoch0 = [c for s in before + per_step for c in s]
    assert len(epoch0) == len(set(epoch0)) == 3 * 16 + 32


def test_plan_cli_agrees_with_training(shards, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "run_dir: runs/x\nmodel: {d_model: 64, n_layer: 2}\n"
        f"data:\n  shards: {shards}\n  seq_len: 1024\n  tokens_per_step: 4096\n  rc_probability: 0.5\n"
        "  curriculum:\n    stages: [{seq_len: 256, steps: 2}, {seq_len: 1024}]\n"
        "train: {seed: 11, grad_accum: 2, max_steps: 100}\noptim: {lr: 0.001}\n")
    out = subprocess.run([sys.executable, "-m", "caduceus_dist.data.plan", "--config", str(recipe),
                          "--world-size", "2", "--steps", "1:4"],
                         capture_output=True, text=True, cwd=REPO, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 3 * 2 * 2
    cfg = config(shards, seq_len=1024, tokens_per_step=4096, seed=None,
                 curriculum=CurriculumConfig(stages=[StageConfig(256, 2), StageConfig(1024)]))
    consumed = {}
    for rank in range(2):
        for sb in TrainStream(cfg, rank, 2, 2, train_seed=11).iterate(1, 4):
            for micro, batch in enumerate(sb.micro_batches):
                consumed[(sb.step, rank, micro)] = batch
    for line in lines:
        batch = consumed[(line["step"], line["rank"], line["micro"])]
        assert line["seq_len"] == batch["input_ids"].shape[1] == (256 if line["step"] < 2 else 1024)
        assert line["source"] == ["default"] * len(line["sample_id"])
        assert line["sample_id"] == batch["sample_id"].tolist()
        assert line["crop_offset"] == batch["crop_offset"].tolist()
        assert line["strand"] == batch["strand"].tolist()

    assert plan_main(["--config", str(recipe), "--world-size", "3"]) == 2
    assert "world_size 3 x grad_accum 2 = 6" in capsys.readouterr().err


def test_plan_stats_count_the_plans_windows_and_state_the_independent_draw_values(shards, tmp_path, capsys):
    """--stats against the plan lines themselves and against simulated independent draws."""
    overrides = [f"data.shards={shards}", "data.seq_len=1024", "data.tokens_per_step=8192",
                 "data.curriculum.stages=[{seq_len: 256, steps: 5}, {seq_len: 1024}]"]
    assert plan_main(["--steps", "0:12", *overrides]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert plan_main(["--steps", "0:12", "--stats", *overrides]) == 0
    printed = capsys.readouterr()
    stats = [json.loads(line) for line in printed.out.splitlines()]
    assert "distinct_independent = sum_k W_k h_k" in printed.err  # the formulas, once, beside the JSON lines
    assert [(s["stage"], s["steps"], s["seq_len"], s["rows_per_step"]) for s in stats] == [(0, 5, 256, 32), (1, 7, 1024, 8)]
    for stage in stats:
        steps = range(stage["first_step"], stage["first_step"] + stage["steps"])
        drawn = [{i for line in lines if line["step"] == step for i in line["sample_id"]} for step in steps]
        assert stage["distinct_windows"] == round(sum(map(len, drawn)) / len(drawn), 2)
        reuse = [len(a & b) / len(a) for a, b in itertools.pairwise(drawn)]
        assert stage["reuse_next_step"] == round(sum(reuse) / len(reuse), 4)
        windows, rows = stage["windows_in_split"], stage["rows_per_step"]
        draws = np.random.default_rng(0).integers(0, windows, size=(20000, rows))
        simulated = np.mean([len(set(row)) for row in draws])
        assert stage["distinct_independent"] == pytest.approx(simulated, rel=0.01)  # 20,000 simulated steps
        assert stage["distinct_ratio"] == pytest.approx(stage["distinct_windows"] / stage["distinct_independent"],
                                                        abs=2e-3)  # of rounded figures


@pytest.mark.parametrize("split", ["valid", "test"])
def test_eval_stream_is_identical_at_any_world_size(shards, split):
    cfg = config(shards, eval_batch_size=6, num_workers=2)
    streams = {}
    for world in (1, 2, 4):
        loaders = [build_eval_loader(cfg, split, rank, world) for rank in range(world)]
        passes = [list(loader) for loader in loaders]
        assert len({len(p) for p in passes}) == 1
        merged = [{k: torch.cat([p[i][k] for p in passes]) for k in ("input_ids", "targets", "sample_id",
                                                                     "crop_offset")} for i in range(len(passes[0]))]
        streams[world] = merged
    windows = 5 if split == "valid" else 2
    assert sum(len(b["sample_id"]) for b in streams[1]) == windows * 4
    for world in (2, 4):
        assert len(streams[world]) == len(streams[1])
        for a, b in zip(streams[world], streams[1], strict=True):
            for key in a:
                assert torch.equal(a[key], b[key])
    again = list(build_eval_loader(cfg, split, 0, 1))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(again, streams[1], strict=True))
    assert len(build_eval_loader(cfg, split, 0, 1, max_batches=1)) == 1


def test_config_errors_name_the_numbers(shards, odd_shards):
    with pytest.raises(DataPlanError, match=r"global batch 16 sequences .* world_size 3 x grad_accum 2 = 6"):
        TrainStream(config(shards), 0, 3, 2)
    with pytest.raises(DataPlanError, match="seq_len 384 does not divide the stored window length 1024"):
        TrainStream(config(shards, seq_len=384, tokens_per_step=384 * 4), 0, 1, 1)
    with pytest.raises(DataPlanError, match="tokens_per_step 1000 is not divisible by seq_len 256"):
        TrainStream(config(shards, tokens_per_step=1000), 0, 1, 1)
    with pytest.raises(ValueError, match=r"data\.mlm_probability must be in"):
        TrainStream(config(shards, mlm_probability=1.5), 0, 1, 1)
    with pytest.raises(ValueError, match=r"data\.curriculum\.stages\[0\] needs steps or tokens"):
        TrainStream(config(shards, curriculum=CurriculumConfig(stages=[StageConfig(256), StageConfig(1024)])), 0, 1, 1)
    stream = TrainStream(config(shards), 0, 1, 1)
    state = stream.state_dict()
    with pytest.raises(DataPlanError, match="key 'seed' is 7 but this run uses seed 8"):
        TrainStream(config(shards, seed=8), 0, 1, 1).load_state_dict(state)
    with pytest.raises(DataPlanError, match=r"source 'default' changed since the checkpoint: \(saved, now\) = "
                                            r"\{'windows': \(40, 37\)\}"):
        TrainStream(config(odd_shards), 0, 1, 1).load_state_dict(state)


def test_real_sharder_output_one_epoch_matches_the_fasta(tmp_path):
    """Shards written by the sharder from the embedded sample: an epoch at 2 ranks is every base once, and each
    row is the FASTA at the coordinates its provenance names (pyfaidx, independent of both sharder and loader)."""
    import pyfaidx

    from caduceus_dist.prep.sharding import sample_config, shard_genome
    from caduceus_dist.shard_format import ShardReader

    root = tmp_path / "sample"
    shard_genome(sample_config(out=str(root), quiet=True))
    manifest = json.loads((root / "manifest.json").read_text())
    window, windows = manifest["window"], manifest["splits"]["train"]["windows"]
    meta = {}
    for shard in manifest["splits"]["train"]["shards"]:
        reader = ShardReader(root / shard["tar"], root / shard["index"], manifest["format_version"])
        meta.update({m["id"]: m for m in map(reader.read_meta, range(len(reader)))})
    seq_len = window // 4
    cfg = DataConfig(shards=str(root), seq_len=seq_len, tokens_per_step=seq_len * 2 * windows, mlm_probability=0.0,
                     rc_probability=0.5, seed=3)
    fasta_gz = REPO / "caduceus_dist" / "sample" / "hg38_sample.fa.gz"
    plain = tmp_path / "sample.fa"
    plain.write_bytes(gzip.decompress(fasta_gz.read_bytes()))
    fasta = pyfaidx.Fasta(str(plain))
    coverage = {i: np.zeros(window, dtype=np.int64) for i in range(windows)}
    tokenizer = CaduceusTokenizer()
    for rank in range(2):
        for sb in TrainStream(cfg, rank, 2, 1).iterate(0, 2):  # 2 steps x 2 crops per window = one epoch
            batch = sb.micro_batches[0]
            for row, sample, offset, strand in zip(batch["input_ids"], batch["sample_id"].tolist(),
                                                   batch["crop_offset"].tolist(), batch["strand"].tolist(),
                                                   strict=True):
                coverage[sample][offset:offset + seq_len] += 1
                m = meta[sample]
                bases = str(fasta[m["chrom"]][m["start"] + offset:m["start"] + offset + seq_len])
                want = tokenizer.encode(bases)
                want = COMPLEMENT_IDS[want[::-1]] if strand else want
                want = np.where(want == 11, PAD_ID, want)
                assert np.array_equal(row.numpy(), want.astype(np.int64)), (sample, offset, strand)
    assert all((c == 1).all() for c in coverage.values())


def test_batches_kept_by_the_caller_are_never_overwritten(shards):
    """The builder reuses its output buffers (no page faults per batch), but only those nobody holds."""
    stream = TrainStream(config(shards, num_workers=0), 0, 1, 1)
    kept = [stream._builder.build(stream.rows(step, 0, 0)) for step in range(4)]
    snapshots = [{k: v.copy() for k, v in batch.items()} for batch in kept]
    rows = [stream.rows(step, 0, 0) for step in range(4, 8)]
    for row in rows:  # dropped at once: these share one buffer
        stream._builder.build(row)
    for batch, snapshot in zip(kept, snapshots, strict=True):
        for key, value in snapshot.items():
            assert np.array_equal(batch[key], value), key
    fresh = TrainStream(config(shards, num_workers=0), 0, 1, 1)
    for step, batch in enumerate(kept):
        again = fresh._builder.build(fresh.rows(step, 0, 0))
        assert np.array_equal(again["input_ids"], batch["input_ids"])
        assert np.array_equal(again["targets"], batch["targets"])


def test_streams_leave_the_global_torch_rng_alone(shards):
    """The trainer checkpoints the global RNG; a resumed run must not be one draw off (DataLoader seeds)."""
    cfg = config(shards)
    before = torch.random.get_rng_state()
    list(TrainStream(cfg, 0, 1, 1).iterate(0, 2))
    list(build_eval_loader(cfg, "valid", 0, 1, max_batches=1))
    assert torch.equal(before, torch.random.get_rng_state())


def test_stage_durations_in_tokens(shards):
    stages = [StageConfig(seq_len=256, tokens=3 * 4096), StageConfig(seq_len=1024)]
    stream = TrainStream(config(shards, seq_len=1024, curriculum=CurriculumConfig(stages=stages)), 0, 1, 1)
    assert [stream.plan(s).seq_len for s in range(5)] == [256, 256, 256, 1024, 1024]
    bad = [StageConfig(seq_len=256, tokens=4096 + 256), StageConfig(seq_len=1024)]
    with pytest.raises(DataPlanError, match="tokens 4352 is not a whole number of steps of 4096 tokens"):
        TrainStream(config(shards, seq_len=1024, curriculum=CurriculumConfig(stages=bad)), 0, 1, 1)


@pytest.mark.gpu
def test_batches_are_pinned_where_cuda_is_available(shards):
    sb = next(iter(TrainStream(config(shards), 0, 1, 1).iterate(0, 1)))
    assert all(sb.micro_batches[0][k].is_pinned() for k in ("input_ids", "targets", "sample_id"))
    assert all(b["input_ids"].is_pinned() for b in build_eval_loader(config(shards), "valid", 0, 1, max_batches=1))


def test_feistel_permutation_is_a_keyed_bijection():
    from caduceus_dist.data.cursor import derive_key, feistel_permute

    for n in (1, 2, 3, 5, 64, 457, 1000, 4097):
        perm = feistel_permute(np.arange(n), n, derive_key(1, n))
        assert sorted(perm.tolist()) == list(range(n))
    a, b = (feistel_permute(np.arange(1000), 1000, derive_key(1, epoch)) for epoch in (0, 1))
    assert (a != b).mean() > 0.9 and abs(np.corrcoef(np.arange(1000), a)[0, 1]) < 0.1


def test_closing_the_stream_stops_its_thread_and_workers(shards):
    def gone(alive) -> bool:
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not alive()

    it = TrainStream(config(shards), 0, 1, 1).iterate()  # unbounded
    next(it)
    it.close()
    assert gone(lambda: any(t.name == "caduceus-data-convert" for t in threading.enumerate()))
    assert gone(multiprocessing.active_children)


def _data_workers() -> list[int]:
    """Pids of this process's DataLoader workers, from /proc (children other than multiprocessing's
    resource tracker, which spawn starts too)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"resource_tracker" not in cmdline:
            found.append(int(stat.parent.name))
    return found


def _ignores(pid: int, signum: int) -> bool:
    """Whether process `pid` has `signum` set to SIG_IGN (its /proc status SigIgn mask)."""
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(ignored >> (signum - 1) & 1)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_ignore_the_jobs_signals(shards, start_method):
    """Ctrl-C and the forwarded USR2 (scancel --signal) reach the whole job, workers included; only the
    trainer acts on them, so a worker keeps delivering batches (with any start method: spawned workers do
    not inherit the trainer's handlers). SIGTERM keeps its default, which multiprocessing needs to stop
    workers at interpreter exit."""
    stream = TrainStream(config(shards, num_workers=2, worker_start_method=start_method), 0, 1, 1)
    batches = stream.iterate(0, 8)
    assert next(batches).step == 0
    workers = _data_workers()
    assert len(workers) >= 2
    deadline = time.monotonic() + 60  # spawned workers finish starting first (their bootstrap unblocks SIGINT)
    while time.monotonic() < deadline and not all(_ignores(pid, signal.SIGINT) for pid in workers):
        time.sleep(0.05)
    for pid in workers:
        assert not _ignores(pid, signal.SIGTERM)
        for signum in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            os.kill(pid, signum)
    time.sleep(0.5)
    assert [batch.step for batch in batches] == list(range(1, 8))
