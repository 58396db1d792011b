"""MLM corruption (docs/reference-recipe.md §3, §4) and RC augmentation: statistics, semantics, independence of rank/worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_fixtures import genome_tokens, softmasked_tokens, write_dataset

from caduceus_dist import native
from caduceus_dist.data import DataConfig, TrainStream, masking
from caduceus_dist.data.crops import orient
from caduceus_dist.data.cursor import BLOCK_TOKENS, UniformStream, derive_key, token_blocks
from caduceus_dist.data.dataset import ShardSplit
from caduceus_dist.data.masking import MaskingPolicy, default_masker, mask_batch, masked_crops
from caduceus_dist.model.tokenizer import MASK_ID, N_ID, PAD_ID, VOCAB_SIZE, CaduceusTokenizer
from caduceus_dist.shard_format import SOFTMASK_FLAG

SIGMAS = 5.0  # tolerance for every frequency check; a false failure has probability < 1e-6 per check


def uniform_u32(keys: np.ndarray, length: int) -> np.ndarray:
    """The whole (len(keys), length) uint32 array of the per-row streams the masking draws from."""
    stream = UniformStream(keys, length)
    out = np.empty((len(stream.keys), length), dtype=np.uint32)
    for rows, col, cols in token_blocks(len(stream.keys), length):
        out[rows, col:col + cols] = stream.block(rows, col, cols)
    return out


def real_batch(rows: int, length: int, n_run: tuple[int, int] | None = None) -> np.ndarray:
    tokens, _, _ = genome_tokens()
    batch = tokens[:rows * length].reshape(rows, length).copy()
    if n_run is not None:  # an assembly gap: a run of N as in real chromosomes
        batch[:, n_run[0]:n_run[1]] = N_ID
    return orient(batch, np.zeros(rows, dtype=np.int64))


def within(observed: int, trials: int, p: float) -> bool:
    return abs(observed - trials * p) <= SIGMAS * np.sqrt(trials * p * (1 - p))


def test_selection_and_80_10_10_frequencies():
    tokens = real_batch(180, 1024)  # 184,320 real bases, no N
    policy = MaskingPolicy()
    inputs, targets = mask_batch(tokens, derive_key(3, np.arange(180)), policy)
    selected = targets != PAD_ID
    n, k = tokens.size, int(selected.sum())
    assert within(k, n, 0.15)  # about 27,650 selected; 5 sigma = 0.41% of n... see SIGMAS
    assert np.array_equal(targets[selected], tokens[selected])
    assert np.array_equal(inputs[~selected], tokens[~selected])
    sel_in, sel_orig = inputs[selected], tokens[selected]
    # a random replacement can draw [MASK] (1/12) or the original id (1/12)
    assert within(int((sel_in == MASK_ID).sum()), k, 0.8 + 0.1 / VOCAB_SIZE)
    assert within(int((sel_in == sel_orig).sum()), k, 0.1 + 0.1 / VOCAB_SIZE)
    other = (sel_in != MASK_ID) & (sel_in != sel_orig)
    assert within(int(other.sum()), k, 0.1 * (VOCAB_SIZE - 2) / VOCAB_SIZE)
    # random ids are uniform over all 12 ids, specials included (docs/reference-recipe.md §4: no eligible_replacements)
    counts = np.bincount(sel_in[other], minlength=VOCAB_SIZE)
    for token in range(VOCAB_SIZE):
        if token == MASK_ID:
            continue
        trials = int((sel_orig != token).sum())  # positions where `token` counts as "other"
        assert within(int(counts[token]), trials, 0.1 / VOCAB_SIZE), (token, counts)
    # independent positions: P(i and i+1 both selected) = p^2
    both = int((selected[:, 1:] & selected[:, :-1]).sum())
    assert within(both, selected[:, 1:].size, 0.15 ** 2)


def test_masking_matches_the_reference_rules_position_by_position():
    """Independent per-position implementation of mlm_getitem's rules on the same uniform draws."""
    tokens = real_batch(4, 2048, n_run=(100, 400))
    keys = derive_key(9, np.arange(4))
    policy = MaskingPolicy(0.3, 0.6, 0.3)  # non-default probabilities are honoured
    inputs, targets = mask_batch(tokens, keys, policy)
    u = uniform_u32(keys, 2048).astype(np.float64) / 2 ** 32  # the same stream, as floats in [0, 1)
    for row in range(4):
        for pos in range(2048):
            x, v = int(tokens[row, pos]), u[row, pos]
            if v >= 0.3:
                assert (inputs[row, pos], targets[row, pos]) == (x, PAD_ID)
                continue
            assert targets[row, pos] == x  # [PAD] (from N) stays the target, i.e. ignored
            w = v / 0.3
            if w < 0.6:
                assert inputs[row, pos] == MASK_ID
            elif w < 0.9:
                assert inputs[row, pos] == int((w - 0.6) / 0.3 * VOCAB_SIZE)
            else:
                assert inputs[row, pos] == x


def test_n_becomes_pad_and_is_never_a_loss_target():
    tokens = real_batch(8, 1024, n_run=(200, 700))
    assert (tokens[:, 200:700] == PAD_ID).all() and not (tokens == N_ID).any()
    inputs, targets = mask_batch(tokens, derive_key(1, np.arange(8)), MaskingPolicy())
    assert (targets[:, 200:700] == PAD_ID).all()
    gap = inputs[:, 200:700]  # selected like any position (no exclusion), so [MASK] appears inside gaps
    assert within(int((gap == MASK_ID).sum()), gap.size, 0.15 * (0.8 + 0.1 / VOCAB_SIZE))
    assert within(int((gap != PAD_ID).sum()), gap.size, 0.15 * (0.8 + 0.1 * (VOCAB_SIZE - 1) / VOCAB_SIZE))


def test_reverse_complement_then_n_to_pad():
    window = CaduceusTokenizer().encode("ACGTNNacgtAAC")
    out = orient(window[None], np.array([1]))[0]
    assert CaduceusTokenizer.decode(out[out != PAD_ID]) == "GTTACGTACGT"
    assert np.flatnonzero(out == PAD_ID).tolist() == [7, 8]
    flagged = window | np.where(np.arange(13) < 6, SOFTMASK_FLAG, 0).astype(np.uint8)  # the soft-mask flag rides along
    out_flagged = orient(flagged[None], np.array([1]))[0]
    np.testing.assert_array_equal(out_flagged & (SOFTMASK_FLAG - 1), out)
    assert np.flatnonzero(out_flagged & SOFTMASK_FLAG).tolist() == list(range(7, 13))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mask_shards")
    write_dataset(root, 2048, {"train": [6, 10]})
    return root


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_masks_and_strands_do_not_depend_on_rank_or_worker(shards):
    def by_crop(world_size, grad_accum, workers):
        cfg = DataConfig(shards=str(shards), seq_len=512, tokens_per_step=512 * 16, num_workers=workers,
                         rc_probability=0.5, seed=5)
        rows = {}
        for rank in range(world_size):
            for sb in TrainStream(cfg, rank, world_size, grad_accum).iterate(0, 4):
                for batch in sb.micro_batches:
                    for i, key in enumerate(zip(batch["epoch"].tolist(), batch["sample_id"].tolist(),
                                                batch["crop_offset"].tolist(), strict=True)):
                        rows[key] = (batch["input_ids"][i], batch["targets"][i], int(batch["strand"][i]))
        return rows

    single, spread = by_crop(1, 1, 0), by_crop(4, 2, 3)
    assert single.keys() == spread.keys() and len(single) == 64
    for key, (inputs, targets, strand) in single.items():
        assert torch.equal(inputs, spread[key][0]) and torch.equal(targets, spread[key][1])
        assert strand == spread[key][2]
    strands = [v[2] for v in single.values()]
    assert within(sum(strands), len(strands), 0.5)


def test_masks_change_between_epochs_but_not_between_runs(shards):
    cfg = DataConfig(shards=str(shards), seq_len=2048, tokens_per_step=2048 * 16, num_workers=0, seed=5)
    stream = TrainStream(cfg, 0, 1, 1)
    first = {}
    for sb in stream.iterate(0, 2):  # 16 windows = exactly one epoch per step
        batch = sb.micro_batches[0]
        for i in range(16):
            key = int(batch["sample_id"][i])
            if sb.step == 0:
                first[key] = batch["input_ids"][i]
            else:
                assert not torch.equal(first[key], batch["input_ids"][i])  # re-masked in epoch 1
    again = next(iter(TrainStream(cfg, 0, 1, 1).iterate(0, 1))).micro_batches[0]
    for i in range(16):
        assert torch.equal(again["input_ids"][i], first[int(again["sample_id"][i])])


@pytest.mark.parametrize(("version", "window"), [(2, 1024), (3, 1024), (3, 8192)])
def test_read_crops_gives_the_stored_bases_of_every_crop(tmp_path, version, window):
    """`ShardSplit.read_crops` against the stored windows: soft-mask flags and N runs, lengths that are and are not
    multiples of 4 (the batch decoder and the per-crop one), crops in every block of a runs member's block
    table (8192-base windows: two blocks), more windows than version 2's cache holds."""
    tokens = softmasked_tokens()
    count = 80 * 1024 // window
    write_dataset(tmp_path, window, {"train": [count // 2, count - count // 2]}, tokens=tokens, version=version)
    split = ShardSplit(tmp_path, "train")
    split.WINDOW_CACHE = 8
    windows = tokens[:count * window].reshape(count, window)
    rng = np.random.default_rng(0)
    for length in (256, 1024, 128, 4, 7, 341, window):
        for _ in range(3):
            ids = rng.integers(0, count, 20)
            offsets = rng.integers(0, window // length, 20) * length
            out = np.empty((20, length), dtype=np.uint8)
            split.read_crops(ids, offsets, out)
            for row, (i, o) in enumerate(zip(ids, offsets, strict=True)):
                np.testing.assert_array_equal(out[row], windows[i, o:o + length])
    assert (windows >= SOFTMASK_FLAG).any() and (windows & (SOFTMASK_FLAG - 1) == N_ID).any()


@pytest.mark.skipif(native.load("mlm_mask") is None, reason="no C compiler, or CADUCEUS_NATIVE=0: no native kernel")
def test_native_kernel_gives_the_numpy_bytes():
    """Random windows (real bases, N runs, soft-masked runs, every byte value), odd and block-straddling lengths,
    L = 1, both strands, edge probabilities: the two backends agree bit for bit."""
    assert default_masker() == "native"
    tokens, _, _ = genome_tokens()
    rng = np.random.default_rng(0)
    policies = [MaskingPolicy(), MaskingPolicy(0.3, 0.6, 0.3), MaskingPolicy(1.0, 0.8, 0.2), MaskingPolicy(0.0),
                MaskingPolicy(0.5, 0.0, 1.0), MaskingPolicy(0.5, 1.0, 0.0), MaskingPolicy(1.0, 0.0, 0.0)]
    lengths = [1, 2, 3, 7, 64, 255, 1024, BLOCK_TOKENS // 8 + 1, 4097, 3 * 4096 + 5]
    compared = 0
    for case in range(120):
        length = lengths[case % len(lengths)]
        window = length * int(rng.integers(1, 5))
        n_windows = int(rng.integers(1, min(9, len(tokens) // window + 1)))
        start = int(rng.integers(0, len(tokens) - n_windows * window))
        windows = tokens[start:start + n_windows * window].reshape(n_windows, window).copy()
        if case % 3 == 0:  # an assembly gap, and every byte value (ids, specials, bytes no id has)
            gap = int(rng.integers(0, window))
            windows[:, gap:gap + int(rng.integers(1, window + 1))] = N_ID
            windows[0, :min(window, 256)] = np.arange(min(window, 256))
        elif case % 3 == 1:  # a soft-masked run (flagged bytes, the vector path), N inside it
            first = int(rng.integers(0, window))
            windows[:, first:first + int(rng.integers(1, 200))] |= SOFTMASK_FLAG
        rows = int(rng.integers(1, 40))
        sample_ids = rng.integers(0, n_windows, rows)
        offsets = rng.integers(0, window // length, rows) * length
        strands = rng.integers(0, 2, rows)
        keys = derive_key(case, 11, sample_ids, offsets, length)
        policy = policies[case % len(policies)]
        stored = np.stack([windows[i, o:o + length] for i, o in zip(sample_ids, offsets, strict=True)])
        native_out = masked_crops(stored, strands, keys, policy, backend="native")
        numpy_out = masked_crops(stored, strands, keys, policy, backend="numpy")
        for got, want in zip(native_out, numpy_out, strict=True):
            assert got.dtype == want.dtype == np.uint8 and got.shape == want.shape == (rows, length)
            assert np.array_equal(got, want), (case, length, policy)
        compared += native_out[0].size
    assert compared > 1_000_000


def test_forcing_the_native_masker_without_its_kernel_fails_naming_the_fix(monkeypatch):
    """With the kernel unavailable, an explicit 'native' request says so (the default falls back to NumPy)."""
    monkeypatch.setattr(masking, "_kernel", lambda: None)
    assert default_masker() == "numpy"
    args = (np.full((1, 8), 7, dtype=np.uint8), np.zeros(1, np.int64),
            derive_key(0, 11, np.zeros(1, np.int64), np.zeros(1, np.int64), 8), MaskingPolicy())
    with pytest.raises(RuntimeError, match=r"masking backend 'native' is unavailable.*'numpy' backend"):
        masked_crops(*args, backend="native")
    assert masked_crops(*args)[0].shape == (1, 8)
