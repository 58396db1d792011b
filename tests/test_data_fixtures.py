"""Builders of small, real shard directories for the loader tests (and checks of the builders).

Shards are written with the project's own `ShardWriter` from real hg38 sequence (the embedded
sample's chr22 piece), so the loader reads exactly what `data_prep/shard_genome.py` writes: same
tar layout, index and manifest keys.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np

from caduceus_dist.data.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ShardReader,
    ShardWriter,
    sample_key,
    sha256_file,
    shard_name,
    write_index,
)
from caduceus_dist.model.tokenizer import BYTE_TO_ID

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "caduceus_dist" / "sample" / "hg38_sample.fa.gz"  # embedded: every clone has it


def genome_tokens() -> tuple[np.ndarray, str, int]:
    """Token ids of real hg38 (the embedded sample's chr22:16.6-16.8 Mb record), its name and 0-based start."""
    records = gzip.decompress(SAMPLE.read_bytes()).split(b">")[1:]
    header, _, body = records[0].partition(b"\n")
    seq = body.replace(b"\n", b"").replace(b"\r", b"")
    return BYTE_TO_ID[np.frombuffer(seq, dtype=np.uint8)], header.split()[0].decode(), 16_599_999


def write_dataset(root: Path, window: int, shard_sizes: dict[str, list[int]], start: int = 0,
                  tokens: np.ndarray | None = None) -> dict:
    """Windows of `window` consecutive bases, split after split, into shards of the given sample counts."""
    if tokens is None:
        tokens, chrom, base = genome_tokens()
    else:
        chrom, base = "synthetic", 0
    root.mkdir(parents=True, exist_ok=True)
    cursor = start
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "created_by": "tests/test_data_fixtures.py",
                "args": {"window": window}, "assembly": "hg38", "fasta": {"path": str(SAMPLE), "sha256": "n/a"},
                "window": window, "splits": {}}
    for split, sizes in shard_sizes.items():
        (root / split).mkdir(exist_ok=True)
        shards, sample_id, n_bases = [], 0, 0
        for number, size in enumerate(sizes):
            tar, idx = root / split / f"{shard_name(number)}.tar", root / split / f"{shard_name(number)}.idx"
            writer = ShardWriter(tar)
            first = sample_id
            for _ in range(size):
                if cursor + window > len(tokens):
                    raise ValueError("not enough sequence for the requested windows")
                piece = tokens[cursor:cursor + window]
                meta = {"id": sample_id, "split": split, "chrom": chrom, "start": base + cursor,
                        "end": base + cursor + window, "strand": "+", "length": window,
                        "n_fraction": float(np.mean(piece == 11)), "assembly": "hg38", "fasta_sha256": "n/a"}
                writer.add(sample_key(split, sample_id), meta, piece)
                n_bases += int(np.sum(piece == 11))
                cursor += window
                sample_id += 1
            write_index(idx, writer.close())
            shards.append({"tar": f"{split}/{tar.name}", "index": f"{split}/{idx.name}", "samples": size,
                           "bytes": tar.stat().st_size, "sha256": sha256_file(tar),
                           "index_sha256": hashlib.sha256(idx.read_bytes()).hexdigest(),
                           "first_id": first, "last_id": sample_id - 1})
        manifest["splits"][split] = {"windows": sample_id, "bases": sample_id * window, "n_bases": n_bases,
                                     "dropped_windows": 0, "shards": shards}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def all_windows(root: Path, split: str) -> dict[int, np.ndarray]:
    """sample id -> stored tokens, read independently of the loader (for reference comparisons)."""
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        reader = ShardReader(root / shard["tar"], root / shard["index"])
        for k in range(len(reader)):
            out[reader.read_meta(k)["id"]] = reader.read_tokens(k)
        reader.close()
    return out


def test_fixture_round_trips_real_sequence(tmp_path):
    tokens, _, _ = genome_tokens()
    write_dataset(tmp_path, 256, {"train": [3, 1, 2], "valid": [2]})
    windows = all_windows(tmp_path, "train")
    assert sorted(windows) == list(range(6))
    for sample_id, stored in windows.items():
        assert np.array_equal(stored, tokens[sample_id * 256:(sample_id + 1) * 256])
    valid = all_windows(tmp_path, "valid")
    assert np.array_equal(valid[1], tokens[7 * 256:8 * 256])
