"""Mixtures of genomes: row counts per source against the weights, phases, resume, diversity, soft-mask flags.

Real shard files (the project's ShardWriter, real hg38 sequence; the sharder on the embedded collection)
and real DataLoader workers, as in test_data_loader.py.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyfaidx
import pytest
import torch
from test_data_fixtures import softmasked_tokens, write_dataset
from test_data_loader import resume_after

from caduceus_dist.data import DataConfig, TrainStream
from caduceus_dist.data.config import MixturePhase, SourceConfig
from caduceus_dist.data.curriculum import DataPlanError
from caduceus_dist.data.dataset import ShardSplit
from caduceus_dist.data.plan import main as plan_main
from caduceus_dist.model.tokenizer import COMPLEMENT_IDS
from caduceus_dist.prep.collection import SAMPLE_COLLECTION, shard_collection
from caduceus_dist.shard_format import ShardFormatError, ShardReader

WINDOW = 1024
SIGMAS = 5.0


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """Three sources of different sizes (40, 12 and 4 windows of 1024), different sequence each."""
    tokens = softmasked_tokens()
    base = tmp_path_factory.mktemp("mixture")
    sizes = {"big": [20, 20], "mid": [12], "small": [4]}
    out, start = {}, 0
    for name, shards in sizes.items():
        out[name] = base / name
        write_dataset(out[name], WINDOW, {"train": shards, "valid": [2]}, start=start, tokens=tokens)
        start += (sum(shards) + 2) * WINDOW
    return out


def mixture(roots: dict[str, Path], weights: dict[str, float], phases: list[MixturePhase] | None = None,
            **kw) -> DataConfig:
    base = dict(seq_len=256, tokens_per_step=256 * 32, num_workers=0, seed=3, rc_probability=0.5,
                sources=[SourceConfig(name, str(root), weights.get(name, 0.0)) for name, root in roots.items()],
                mixture_schedule=phases or [])
    base.update(kw)
    return DataConfig(**base)


def rows_by_source(stream: TrainStream, step: int) -> Counter:
    counts = Counter()
    for rank in range(stream.world_size):
        for micro in range(stream.grad_accum):
            counts.update(stream.names[k] for k in stream.rows(step, rank, micro).source.tolist())
    return counts


def test_rows_per_step_are_within_one_row_of_the_weights_and_match_them_over_many_steps(roots):
    """Every step: floor or ceil of R w_k rows. Over 3000 steps the totals match R w_k x steps within 5 sigma of
    the per-step rounding's variance (each count is Bernoulli around R w_k: variance <= 1/4)."""
    weights = {"big": 0.55, "mid": 0.3, "small": 0.15}
    stream = TrainStream(mixture(roots, weights), 0, 1, 1)
    rows, steps = 32, 3000
    counts = np.diff(stream.mixture.boundaries(np.arange(steps), rows), axis=1)
    want = np.array([rows * weights[n] for n in stream.names])
    assert np.all(np.abs(counts - want) < 1) and np.all(counts.sum(axis=1) == rows)
    totals = counts.sum(axis=0)
    assert np.all(np.abs(totals - want * steps) <= SIGMAS * np.sqrt(steps / 4)), (totals, want * steps)
    assert not np.all(counts == counts[0])  # the remainders go round: not the same rounding every step
    for step in range(20):  # what rows() hands out is what the boundaries say
        assert rows_by_source(stream, step) == dict(zip(stream.names, counts[step].tolist(), strict=True))


def test_phases_change_the_weights_at_their_first_step_and_zero_means_never_read(roots):
    phases = [MixturePhase(start_step=0, weights={"big": 1.0, "mid": 1.0}),
              MixturePhase(start_tokens=5 * 256 * 32, weights={"big": 1.0, "small": 3.0})]
    stream = TrainStream(mixture(roots, {}, phases), 0, 2, 1)
    assert stream.mixture.phase_starts.tolist() == [0, 5]
    for step in range(5):
        assert rows_by_source(stream, step) == {"big": 16, "mid": 16}
    for step in range(5, 12):
        assert rows_by_source(stream, step) == {"big": 8, "small": 24}
    unread = TrainStream(mixture(roots, {"big": 1.0, "mid": 0.0}), 0, 1, 1)
    assert unread.names == ["big"]  # never opened: weight 0 in every phase


def test_a_small_source_goes_round_its_epochs_while_a_large_one_is_in_its_first(roots):
    stream = TrainStream(mixture(roots, {"big": 1.0, "small": 1.0}), 0, 1, 1)
    seen = {"big": [], "small": []}
    for step in range(10):
        rows = stream.rows(step, 0, 0)
        for k, epoch, sample, offset in zip(rows.source.tolist(), rows.epoch.tolist(), rows.sample_id.tolist(),
                                            rows.offset.tolist(), strict=True):
            seen[stream.names[k]].append((epoch, sample, offset))
    small_epochs = Counter(e for e, _, _ in seen["small"])
    assert max(small_epochs) >= 9 and all(count == 16 for e, count in small_epochs.items() if e < max(small_epochs))
    for epoch in range(max(small_epochs)):  # each of its full epochs is all 16 of its crops once
        assert len({c for c in seen["small"] if c[0] == epoch}) == 16
    assert {e for e, _, _ in seen["big"]} == {0} and len(set(seen["big"])) == len(seen["big"])
    list(stream.iterate(0, 10))
    state = stream.state_dict()
    assert state["step"] == 10  # 16 rows a step each: small (16 crops) went round 10 times, big (160) once
    assert (state["sources"]["small"]["epochs"], state["sources"]["big"]["epochs"]) == (10.0, 1.0)


def crops(stream_batches) -> list[list[tuple]]:
    out = []
    for sb in stream_batches:
        step = []
        for batch in sb.micro_batches:
            step += list(zip(batch["source"].tolist(), batch["epoch"].tolist(), batch["sample_id"].tolist(),
                             batch["crop_offset"].tolist(), batch["strand"].tolist(), strict=True))
        out.append(step)
    return out


def global_crops(cfg, world: int, accum: int, start: int, stop: int, state: dict | None = None):
    per_step = [Counter() for _ in range(start, stop)]
    last = None
    for rank in range(world):
        stream = TrainStream(cfg, rank, world, accum)
        if state is not None:
            stream.load_state_dict(state)
        for step, rows in enumerate(crops(stream.iterate(start, stop))):
            per_step[step].update(rows)
        last = stream.state_dict() if rank == 0 else last
    return per_step, last


PHASES = [MixturePhase(start_step=0, weights={"big": 2.0, "mid": 1.0, "small": 1.0}),
          MixturePhase(start_step=4, weights={"big": 1.0, "mid": 3.0})]


def test_exact_resume_across_a_phase_change_gives_the_same_batches(roots):
    state = resume_after(mixture(roots, {}, PHASES, num_workers=2), 1, 2, 2, done=3, stop=8)  # phase 2 from step 4
    assert set(state["sources"]) == {"big", "mid", "small"} and state["sources"]["small"]["tokens"] > 0


@pytest.mark.parametrize(("before", "after"), [(2, 1), (2, 4)])
def test_elastic_resume_with_a_mixture_continues_the_same_global_sequence(roots, before, after):
    cfg = mixture(roots, {}, PHASES)
    uninterrupted, _ = global_crops(cfg, 1, 1, 0, 10)
    first, state = global_crops(cfg, before, 2, 0, 3)
    second, _ = global_crops(cfg, after, 1, 3, 10, state=state)
    assert first + second == uninterrupted
    flat = [c for step in uninterrupted for c in step.elements()]
    for source in range(3):  # within a source and epoch, no crop twice
        mine = [c for c in flat if c[0] == source]
        assert len({c[:4] for c in mine}) == len(mine)


def test_batches_of_a_version_2_shard_set_equal_those_of_version_3(roots, tmp_path):
    """The same windows in zstd (format 2) and 2-bit (format 3) shards: the same batches, soft-mask flags included."""
    tokens = softmasked_tokens()
    for version in (2, 3):
        write_dataset(tmp_path / f"v{version}", WINDOW, {"train": [9, 7]}, tokens=tokens, version=version)
    batches = []
    for version in (2, 3):
        cfg = DataConfig(shards=str(tmp_path / f"v{version}"), seq_len=256, tokens_per_step=256 * 16, num_workers=0,
                         seed=1, rc_probability=0.5)
        batches.append([sb.micro_batches[0] for sb in TrainStream(cfg, 0, 1, 1).iterate(0, 6)])
    for a, b in zip(*batches, strict=True):
        for key in ("input_ids", "targets", "target_softmasked", "sample_id", "crop_offset", "strand"):
            assert torch.equal(a[key], b[key]), key
    assert sum(int(b["target_softmasked"].sum()) for b in batches[1]) > 0


@pytest.mark.parametrize("curriculum", [False, True])
def test_batch_diversity_meets_the_independent_draw_figures(tmp_path, capsys, curriculum):
    """400 windows, 64 rows per step: distinct windows per step >= 0.9x and next-step reuse <= 1.5x what
    independent uniform draws give, at a fixed length and at every curriculum stage."""
    rng = np.random.default_rng(0)
    write_dataset(tmp_path, WINDOW, {"train": [200, 200]}, tokens=rng.integers(7, 11, 400 * WINDOW).astype(np.uint8))
    overrides = [f"data.shards={tmp_path}", "data.seq_len=1024", "data.tokens_per_step=65536", "data.verify=size"]
    if curriculum:
        overrides.append("data.curriculum.stages=[{seq_len: 128, steps: 40}, {seq_len: 256, steps: 40}, {seq_len: 1024}]")
        overrides[2] = "data.tokens_per_step=8192"
    assert plan_main(["--steps", "0:120", "--stats", *overrides]) == 0
    stats = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(stats) == (3 if curriculum else 1)
    for stage in stats:
        assert stage["distinct_ratio"] >= 0.9 and stage["reuse_ratio"] <= 1.5, stage


def test_mixture_errors_are_one_line_and_name_the_source(roots, tmp_path):
    with pytest.raises(ShardFormatError, match=r"data.sources 'gone': .*gone/manifest.json not found"):
        TrainStream(mixture({**roots, "gone": tmp_path / "gone"}, {"big": 1.0, "gone": 1.0}), 0, 1, 1)
    write_dataset(tmp_path / "short", 512, {"train": [4]})
    with pytest.raises(DataPlanError, match=r"seq_len 1024 does not divide the stored window length 512 of source "
                                            r"'short'"):
        TrainStream(mixture({**roots, "short": tmp_path / "short"}, {"big": 1.0, "short": 1.0}, seq_len=1024,
                            tokens_per_step=1024 * 8), 0, 1, 1)
    with pytest.raises(ValueError, match=r"data.sources: every weight is 0"):
        TrainStream(mixture(roots, {}), 0, 1, 1)
    with pytest.raises(ValueError, match=r"data.mixture_schedule\[1\].weights names \['fish'\], which are not in"):
        TrainStream(mixture(roots, {}, [PHASES[0], MixturePhase(start_step=3, weights={"fish": 1.0})]), 0, 1, 1)
    with pytest.raises(DataPlanError, match=r"data.mixture_schedule\[1\] starts at step 0, not after the phase before"):
        TrainStream(mixture(roots, {}, [PHASES[0], MixturePhase(start_tokens=0, weights={"big": 1.0})]), 0, 1, 1)
    with pytest.raises(ValueError, match=r"data.sources\[1\].name 'big' must be unique"):
        DataConfig(sources=[SourceConfig("big", "a"), SourceConfig("big", "b")]).validate()


def test_soft_mask_flags_of_the_targets_are_the_fasta_case(tmp_path):
    """Sharded from the embedded collection's human piece (41% lower case): with every position a target,
    each target's soft-mask flag is the case of its base in the FASTA, on both strands."""
    shard_collection(SAMPLE_COLLECTION, tmp_path, report=lambda _line: None)
    root = tmp_path / "human"
    manifest = json.loads((root / "manifest.json").read_text())
    plain = tmp_path / "human.fa"
    plain.write_bytes(gzip.decompress((SAMPLE_COLLECTION.parent / "mix_human_hg38_chr16.fa.gz").read_bytes()))
    fasta = pyfaidx.Fasta(str(plain), as_raw=True)
    split = ShardSplit(root, "train")
    starts = {}
    for shard in split.shards:
        reader = ShardReader(shard.tar, shard.index, split.version)
        for k in range(shard.samples):
            starts[shard.first_id + k] = reader.read_meta(k)["start"]
    cfg = DataConfig(shards=str(root), seq_len=1024, tokens_per_step=1024 * 16, num_workers=0, seed=2,
                     rc_probability=0.5, mlm_probability=1.0, mask_fraction=0.0, random_fraction=0.0)
    checked = lower = 0
    for sb in TrainStream(cfg, 0, 1, 1).iterate(0, 9):  # 18 windows x 8 crops / 16 per step: one epoch
        batch = sb.micro_batches[0]
        for targets, flags, sample, offset, strand in zip(batch["targets"], batch["target_softmasked"],
                                                          batch["sample_id"].tolist(), batch["crop_offset"].tolist(),
                                                          batch["strand"].tolist(), strict=True):
            start = starts[sample] + offset
            bases = fasta["chr16"][start:start + 1024]
            case = np.array([c.islower() for c in bases])
            ids = np.array([{"A": 7, "C": 8, "G": 9, "T": 10}.get(c.upper(), 4) for c in bases])
            if strand:
                case, ids = case[::-1], COMPLEMENT_IDS[ids][::-1]
            assert np.array_equal(flags.numpy(), case) and np.array_equal(targets.numpy(), ids)
            checked += case.size
            lower += int(case.sum())
    assert checked == manifest["splits"]["train"]["bases"] and lower == manifest["splits"]["train"]["softmasked_bases"]
