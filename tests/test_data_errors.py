"""Bad input to the loader: each error names the shard / key and says what to do; `on_corrupt: skip`."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest
from rank_scripts import run_on_ranks
from test_data_fixtures import write_dataset

from caduceus_dist.data import DataConfig, TrainStream, build_eval_loader
from caduceus_dist.data.curriculum import DataPlanError
from caduceus_dist.shard_format import ShardFormatError, read_index

WINDOW = 1024


@pytest.fixture
def shards(tmp_path) -> Path:
    root = tmp_path / "shards"
    write_dataset(root, WINDOW, {"train": [4, 6, 6], "valid": [2]})
    return root


def cfg(root: Path, **kw) -> DataConfig:
    base = dict(shards=str(root), seq_len=512, tokens_per_step=512 * 8, num_workers=0, seed=1)
    base.update(kw)
    return DataConfig(**base)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_missing_shard(shards):
    (shards / "train" / "shard-000001.tar").unlink()
    with pytest.raises(ShardFormatError, match=r"shard .*train/shard-000001\.tar is missing .*rerun data_prep"):
        TrainStream(cfg(shards))


def test_missing_index(shards):
    (shards / "train" / "shard-000002.idx").unlink()
    with pytest.raises(ShardFormatError, match=r"shard index .*train/shard-000002\.idx is missing"):
        TrainStream(cfg(shards))


def test_checksum_mismatch(shards):
    tar = shards / "train" / "shard-000002.tar"
    flip_byte(tar, tar.stat().st_size // 2)
    with pytest.raises(ShardFormatError, match=r"shard .*train/shard-000002\.tar: sha256 does not match the manifest"):
        TrainStream(cfg(shards))


def test_truncated_tar(shards):
    tar = shards / "train" / "shard-000000.tar"
    size = tar.stat().st_size
    os.truncate(tar, size // 3)
    with pytest.raises(ShardFormatError, match=rf"shard-000000\.tar is {size // 3} bytes but the manifest says "
                                               rf"{size}: the file is truncated"):
        TrainStream(cfg(shards, verify="size"))


def test_unknown_manifest_version(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["format_version"] = 99
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match="key 'format_version' is 99; this caduceus-dist reads versions 1, 2"):
        TrainStream(cfg(shards))


def test_missing_manifest_and_unknown_split(shards, tmp_path):
    with pytest.raises(ShardFormatError, match=r"manifest\.json not found"):
        TrainStream(cfg(tmp_path / "nowhere"))
    with pytest.raises(ShardFormatError, match=r"has no split 'validation' \(it has \['train', 'valid'\]\)"):
        build_eval_loader(cfg(shards), "validation")


def test_seq_len_that_does_not_divide_the_window(shards):
    with pytest.raises(DataPlanError, match="seq_len 768 does not divide the stored window length 1024"):
        TrainStream(cfg(shards, seq_len=768, tokens_per_step=768 * 8))
    with pytest.raises(DataPlanError, match="eval seq_len 600 does not divide the stored window length 1024"):
        build_eval_loader(cfg(shards, eval_seq_len=600), "valid")


def test_corruption_found_while_reading_names_the_shard_and_sample(shards):
    """A shard that changes under a running job (size kept, so the size check passes) fails in the worker."""
    tar = shards / "train" / "shard-000001.tar"
    rows = read_index(shards / "train" / "shard-000001.idx")
    for sample in range(len(rows)):  # damage the run counts of every sample of the shard
        flip_byte(tar, int(rows[sample, 4]))
    stream = TrainStream(cfg(shards, verify="size", num_workers=2))
    with pytest.raises(ShardFormatError, match=r"shard .*shard-000001\.tar: sample \d has a corrupt runs member"):
        for _ in stream.iterate(0, 4):  # one epoch = 4 steps, so shard 1 is read
            pass


def test_window_length_disagreeing_with_the_manifest(tmp_path):
    root = tmp_path / "short"
    write_dataset(root, 512, {"train": [4]})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["window"] = 1024
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match=r"shard-000000\.tar: sample 0 has room for 512 bases, the manifest "
                                               r"window is 1024"):
        TrainStream(cfg(root))


def test_skip_mode_drops_bad_shards_on_every_rank_alike(shards, caplog):
    tar = shards / "train" / "shard-000001.tar"
    flip_byte(tar, 700)
    (shards / "train" / "shard-000002.tar").unlink()
    with caplog.at_level(logging.WARNING, logger="caduceus_dist.data.dataset"):
        ranks = [TrainStream(cfg(shards, on_corrupt="skip"), rank, 2, 1) for rank in range(2)]
    warned = [r.getMessage() for r in caplog.records]
    assert any("shard-000001.tar" in m and "sha256" in m for m in warned)
    assert any("shard-000002.tar" in m and "missing" in m for m in warned)
    assert [len(r.skipped_shards) for r in ranks] == [2, 2]
    # 4 good windows x 2 crops = 8 crops = one step: both ranks agree and only shard 0 (ids 0-3) is read
    crops = []
    for stream in ranks:
        for sb in stream.iterate(0, 1):
            batch = sb.micro_batches[0]
            crops += list(zip(batch["sample_id"].tolist(), batch["crop_offset"].tolist(), strict=True))
    assert sorted(crops) == [(i, o) for i in range(4) for o in (0, 512)]
    with pytest.raises(ShardFormatError, match="sha256 does not match"):
        TrainStream(cfg(shards))  # the default mode still refuses


def test_skip_mode_with_nothing_left(shards):
    for shard in (shards / "train").glob("*.tar"):
        shard.unlink()
    with pytest.raises(ValueError, match="no windows to read"):
        TrainStream(cfg(shards, on_corrupt="skip"))


def test_bad_data_config_values():
    for key, value, message in [("on_corrupt", "ignore", r"data\.on_corrupt: 'ignore' is not one of"),
                                ("verify", "md5", r"data\.verify: 'md5' is not one of"),
                                ("mask_fraction", 0.95, r"data\.mask_fraction \+ data\.random_fraction must be <= 1")]:
        with pytest.raises(ValueError, match=message):
            DataConfig(**{key: value}).validate()


RANK_SCRIPT = """
import json, os, sys
import torch.distributed as dist
from caduceus_dist.data import dataset
checked = []
real = dataset._check_shard
dataset._check_shard = lambda root, entry, *args: (checked.append(entry["tar"]), real(root, entry, *args))[1]
dist.init_process_group("gloo")
roots = sys.argv[1].split(",")  # one shard directory for all ranks, or one each
try:
    split = dataset.ShardSplit(roots[dist.get_rank() % len(roots)], "train", verify="sha256", on_corrupt=sys.argv[2])
    result = {"skipped": [tar for tar, _ in split.skipped], "windows": len(split.sample_ids)}
except Exception as err:
    result = {"error": f"{type(err).__name__}: {err}"}
result["checked"] = checked
print("RESULT " + json.dumps(result), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.parametrize("on_corrupt", ["skip", "error"])
def test_ranks_share_the_verification_and_agree_on_bad_shards(shards, free_port, on_corrupt):
    """Every rank hashing every shard at every start costs the whole dataset per rank: each checks a share
    (by bytes), and one gather gives all ranks the same verdict, so skipping is consistent and an error
    stops every rank (none waits for a rank that already failed)."""
    flip_byte(shards / "train" / "shard-000002.tar", 700)  # inside a sample: only sha256 sees it
    results = run_on_ranks(RANK_SCRIPT, [str(shards), on_corrupt], free_port)
    checked = [set(r["checked"]) for r in results]
    manifest = json.loads((shards / "manifest.json").read_text())
    all_tars = {s["tar"] for s in manifest["splits"]["train"]["shards"]}
    assert checked[0] | checked[1] == all_tars and not checked[0] & checked[1]  # a share each, all covered
    if on_corrupt == "skip":
        assert results[0]["skipped"] == results[1]["skipped"] == ["train/shard-000002.tar"]
        assert results[0]["windows"] == results[1]["windows"]
    else:
        assert results[0]["error"] == results[1]["error"]
        assert "shard-000002.tar: sha256 does not match the manifest" in results[0]["error"]


@pytest.mark.distributed
@pytest.mark.parametrize("other", ["missing", "different"])
def test_a_rank_that_reads_no_or_another_manifest_stops_every_rank_naming_it(shards, tmp_path, free_port, other):
    """A node with a stale mount or another copy of the shards: every rank stops with the same error,
    naming that rank (before, rank 1 failed alone and rank 0 died later of a broken connection)."""
    copy = tmp_path / "copy"
    if other == "different":
        shutil.copytree(shards, copy)
        manifest = json.loads((copy / "manifest.json").read_text())
        manifest["note"] = "resharded elsewhere"
        (copy / "manifest.json").write_text(json.dumps(manifest))
    results = run_on_ranks(RANK_SCRIPT, [f"{shards},{copy}", "error"], free_port)
    host = socket.gethostname()
    if other == "missing":
        assert results[0]["error"] == results[1]["error"], results
        assert results[0]["error"].startswith(f"ShardFormatError: rank 1 on {host}: {copy}/manifest.json not found")
        assert "rank 0" not in results[0]["error"]
    else:  # each rank names the file it read
        for root, result in zip([shards, copy], results, strict=True):
            assert result["error"] == (f"ShardFormatError: {root}/manifest.json differs between ranks: rank 1 on "
                                       f"{host} read another one than rank 0 on {host}; give every node the same "
                                       "shard directory")


def _hashed_tars(monkeypatch) -> list[str]:
    """Records which shard tars get their sha256 computed (the index files are always hashed)."""
    from caduceus_dist.data import dataset

    hashed, real = [], dataset.sha256_file
    monkeypatch.setattr(dataset, "sha256_file", lambda path: (hashed.append(Path(path).name), real(path))[1])
    return hashed


def test_a_second_start_trusts_the_verified_stamp_until_a_shard_changes(shards, tmp_path, monkeypatch):
    """A requeue must not re-hash ~10 GB on every rank: shards verified before, with the same size and
    mtime, are not hashed again; a shard rewritten since is, and its damage is found."""
    monkeypatch.setenv("CADUCEUS_CACHE", str(tmp_path / "cache"))
    hashed = _hashed_tars(monkeypatch)
    TrainStream(cfg(shards))
    tars = sorted(name for name in hashed if name.endswith(".tar"))
    assert tars == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    hashed.clear()
    TrainStream(cfg(shards))
    assert [name for name in hashed if name.endswith(".tar")] == []
    flip_byte(shards / "train" / "shard-000001.tar", 700)  # same size, new mtime
    with pytest.raises(ShardFormatError, match=r"shard-000001\.tar: sha256 does not match the manifest"):
        TrainStream(cfg(shards))
    assert [name for name in hashed if name.endswith(".tar")] == ["shard-000001.tar"]


def test_verify_cache_off_hashes_everything_even_a_shard_whose_mtime_was_put_back(shards, tmp_path, monkeypatch):
    monkeypatch.setenv("CADUCEUS_CACHE", str(tmp_path / "cache"))
    TrainStream(cfg(shards))
    tar = shards / "train" / "shard-000002.tar"
    before = tar.stat()
    flip_byte(tar, 700)
    os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns))  # what the quick check cannot see
    TrainStream(cfg(shards))  # trusted: size and mtime as verified (docs/loading.md)
    with pytest.raises(ShardFormatError, match=r"shard-000002\.tar: sha256 does not match the manifest"):
        TrainStream(cfg(shards, verify_cache=False))


def test_an_unwritable_stamp_cache_warns_and_still_verifies(shards, tmp_path, monkeypatch, caplog):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("CADUCEUS_CACHE", str(tmp_path / "a_file"))
    hashed = _hashed_tars(monkeypatch)
    with caplog.at_level(logging.WARNING):
        TrainStream(cfg(shards))
        TrainStream(cfg(shards))
    assert "cannot write the verified-shard stamp" in caplog.text
    assert sorted(name for name in hashed if name.endswith(".tar")) == sorted(
        ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"] * 2)


def test_an_unreadable_manifest_is_one_error_naming_it(tmp_path):
    """What a stale mount or a permission gives (as root, a directory in its place is what can be made)."""
    from caduceus_dist.shard_format import load_manifest

    (tmp_path / "shards" / "manifest.json").mkdir(parents=True)
    with pytest.raises(ShardFormatError, match=r"^cannot read .*shards/manifest\.json \(Is a directory\): check "
                                               r"the path and its filesystem$"):
        load_manifest(tmp_path / "shards")
