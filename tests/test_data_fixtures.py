"""Builders of small, real shard directories for the loader tests (and checks of the builders).

Shards are written with `ShardWriter` below (stdlib `tarfile`, an implementation independent of the
sharder's own member packing) from real hg38 sequence (the embedded sample's chr22 piece), in the
layout `data_prep/shard_genome.py` writes: same tar layout, index and manifest keys.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

from caduceus_dist.fsio import sha256_file
from caduceus_dist.model.tokenizer import BYTE_TO_ID
from caduceus_dist.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MEMBER_SUFFIXES,
    TAR_BLOCK,
    ShardReader,
    index_columns,
    sample_key,
    shard_name,
    write_index,
)

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "caduceus_dist" / "sample" / "hg38_sample.fa.gz"  # embedded: every clone has it


def pack_2bit(stored: np.ndarray) -> tuple[bytes, bytes]:
    """Version 3 members of one window, written independently of `shard_format.encode_bases`: a per-base
    weighted sum for the 2-bit codes, itertools.groupby for the runs, a linear search for the block table."""
    ids = (stored & 15).astype(np.int64)
    codes = np.where(ids == 11, 0, ids - 7)
    codes = np.concatenate([codes, np.zeros(-len(codes) % 4, dtype=np.int64)]).reshape(-1, 4)
    packed = (codes * np.array([1, 4, 16, 64])).sum(axis=1).astype(np.uint8).tobytes()
    runs = []
    for flags in (ids == 11, (stored & 16) != 0):
        position, pairs = 0, []
        for value, group in itertools.groupby(flags.tolist()):
            size = len(list(group))
            if value:
                pairs += [position, position + size]
            position += size
        runs.append(pairs)
    blocks = []  # per 4096-base boundary: the first run of each kind ending after it
    for boundary in range(0, 4096 * (-(-len(stored) // 4096) + 1), 4096):
        blocks += [next((i for i, end in enumerate(pairs[1::2]) if end > boundary), len(pairs) // 2) for pairs in runs]
    table = [len(runs[0]) // 2, len(runs[1]) // 2, *blocks, *runs[0], *runs[1]]
    return packed, np.array(table, dtype="<i4").tobytes()


class ShardWriter:
    """Writes one shard (tar + index) sample by sample with stdlib `tarfile`; `close()` returns the index
    rows. The reference the sharder's hand-packed blobs are compared against, and the fixture writer.
    `version` 3 writes 2-bit bases and runs; 1 and 2 a zstd frame of the stored bytes."""

    def __init__(self, tar_path: str | Path, version: int = FORMAT_VERSION):
        self.tar_path, self.version = Path(tar_path), version
        self._tar = tarfile.open(self.tar_path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (open across add())
        self._compressor = zstandard.ZstdCompressor(level=3)
        self._rows: list[int] = []

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
        self.add_members(key, meta, pack_2bit(tokens) if self.version >= 3 else
                         (self._compressor.compress(tokens.tobytes()),))

    def add_members(self, key: str, meta: dict, payloads: tuple[bytes, ...]) -> None:
        """The sample's JSON, then `payloads` as its other members (MEMBER_SUFFIXES of the version)."""
        json_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
        for suffix, payload in zip(MEMBER_SUFFIXES[self.version], (json_bytes, *payloads), strict=True):
            self._rows += self._add_member(key + suffix, payload)

    def close(self) -> np.ndarray:
        self._tar.close()
        return np.asarray(self._rows, dtype="<i8").reshape(-1, index_columns(self.version))


def genome_tokens() -> tuple[np.ndarray, str, int]:
    """Token ids of real hg38 (the embedded sample's chr22:16.6-16.8 Mb record), its name and 0-based start."""
    records = gzip.decompress(SAMPLE.read_bytes()).split(b">")[1:]
    header, _, body = records[0].partition(b"\n")
    seq = body.replace(b"\n", b"").replace(b"\r", b"")
    return BYTE_TO_ID[np.frombuffer(seq, dtype=np.uint8)], header.split()[0].decode(), 16_599_999


def write_dataset(root: Path, window: int, shard_sizes: dict[str, list[int]], start: int = 0,
                  tokens: np.ndarray | None = None, version: int = FORMAT_VERSION) -> dict:
    """Windows of `window` consecutive bases (stored bytes: soft-mask flags allowed), split after split, into
    shards of the given sample counts, in shard format `version`."""
    if tokens is None:
        tokens, chrom, base = genome_tokens()
    else:
        chrom, base = "synthetic", 0
    root.mkdir(parents=True, exist_ok=True)
    cursor = start
    manifest = {"format": FORMAT_NAME, "format_version": version, "created_by": "tests/test_data_fixtures.py",
                "args": {"window": window}, "assembly": "hg38", "fasta": {"path": str(SAMPLE), "sha256": "n/a"},
                "window": window, "splits": {}}
    for split, sizes in shard_sizes.items():
        (root / split).mkdir(exist_ok=True)
        shards, sample_id, n_bases, soft_bases = [], 0, 0, 0
        for number, size in enumerate(sizes):
            tar, idx = root / split / f"{shard_name(number)}.tar", root / split / f"{shard_name(number)}.idx"
            writer = ShardWriter(tar, version)
            first = sample_id
            for _ in range(size):
                if cursor + window > len(tokens):
                    raise ValueError("not enough sequence for the requested windows")
                piece = tokens[cursor:cursor + window]
                meta = {"id": sample_id, "split": split, "chrom": chrom, "start": base + cursor,
                        "end": base + cursor + window, "strand": "+", "length": window,
                        "n_fraction": float(np.mean(piece & 15 == 11)), "assembly": "hg38", "fasta_sha256": "n/a"}
                writer.add(sample_key(split, sample_id), meta, piece)
                n_bases += int(np.sum(piece & 15 == 11))
                soft_bases += int(np.sum(piece >= 16))
                cursor += window
                sample_id += 1
            write_index(idx, writer.close())
            shards.append({"tar": f"{split}/{tar.name}", "index": f"{split}/{idx.name}", "samples": size,
                           "bytes": tar.stat().st_size, "sha256": sha256_file(tar),
                           "index_sha256": hashlib.sha256(idx.read_bytes()).hexdigest(),
                           "first_id": first, "last_id": sample_id - 1})
        manifest["splits"][split] = {"windows": sample_id, "bases": sample_id * window, "n_bases": n_bases,
                                     "softmasked_bases": soft_bases, "dropped_windows": 0, "shards": shards}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def all_windows(root: Path, split: str) -> dict[int, np.ndarray]:
    """sample id -> stored tokens, read independently of the loader (for reference comparisons)."""
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        reader = ShardReader(root / shard["tar"], root / shard["index"], manifest["format_version"])
        for k in range(len(reader)):
            out[reader.read_meta(k)["id"]] = reader.read_tokens(k)
        reader.close()
    return out


def softmasked_tokens() -> np.ndarray:
    """Real hg38 with runs flagged soft-masked (every 3rd block of 100 bases) and runs of N (a 30-base gap every
    700 bases, some inside soft-masked runs)."""
    tokens, _, _ = genome_tokens()
    flagged = tokens.copy()
    position = np.arange(len(tokens))
    flagged[position % 700 < 30] = 11
    flagged[(position // 100) % 3 == 1] |= 16
    return flagged


@pytest.mark.parametrize("version", [2, 3])
def test_fixture_round_trips_real_sequence(tmp_path, version):
    tokens = softmasked_tokens()
    write_dataset(tmp_path, 256, {"train": [3, 1, 2], "valid": [2]}, tokens=tokens, version=version)
    windows = all_windows(tmp_path, "train")
    assert sorted(windows) == list(range(6))
    for sample_id, stored in windows.items():
        assert np.array_equal(stored, tokens[sample_id * 256:(sample_id + 1) * 256])
    valid = all_windows(tmp_path, "valid")
    assert np.array_equal(valid[1], tokens[7 * 256:8 * 256])
