"""Builders of small, real shard directories for the loader tests (and checks of the builders).

Shards are written with `ShardWriter` below (stdlib `tarfile`, an implementation independent of the
sharder's own member packing) from real hg38 sequence (the embedded sample's chr22 piece), in the
layout `data_prep/shard_genome.py` writes: same tar layout, index and manifest keys.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import zstandard

from caduceus_dist.fsio import sha256_file
from caduceus_dist.model.tokenizer import BYTE_TO_ID
from caduceus_dist.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_COLUMNS,
    JSON_SUFFIX,
    MANIFEST_NAME,
    TAR_BLOCK,
    TOKENS_SUFFIX,
    ShardReader,
    sample_key,
    shard_name,
    write_index,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "caduceus_dist" / "sample" / "hg38_sample.fa.gz"  # embedded: every clone has it


class ShardWriter:
    """Writes one shard (tar + index) sample by sample with stdlib `tarfile`; `close()` returns the index
    rows. The reference the sharder's hand-packed blobs are compared against, and the fixture writer."""

    def __init__(self, tar_path: str | Path, zstd_level: int = 3):
        self.tar_path = Path(tar_path)
        self._tar = tarfile.open(self.tar_path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (open across add())
        self._compressor = zstandard.ZstdCompressor(level=zstd_level)
        self._rows: list[tuple[int, int, int, int]] = []

    def _add_member(self, name: str, payload: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        data_offset = self._tar.offset + TAR_BLOCK  # ustar header is one block for names < 100 chars
        self._tar.addfile(info, io.BytesIO(payload))
        return data_offset, len(payload)

    def add(self, key: str, meta: dict, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=np.uint8)
        self.add_compressed(key, meta, self._compressor.compress(tokens.tobytes()))

    def add_compressed(self, key: str, meta: dict, compressed_tokens: bytes) -> None:
        json_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        json_off, json_size = self._add_member(key + JSON_SUFFIX, json_bytes)
        tok_off, tok_size = self._add_member(key + TOKENS_SUFFIX, compressed_tokens)
        self._rows.append((json_off, json_size, tok_off, tok_size))

    def close(self) -> np.ndarray:
        self._tar.close()
        return np.asarray(self._rows, dtype="<i8").reshape(-1, INDEX_COLUMNS)


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
