"""The on-disk shard format: the one contract between preparation (`caduceus_dist.prep`, the writer) and
loading (`caduceus_dist.data`, the reader). docs/shard-format.md describes it for users.

Layout of a dataset root (format version 2; version 1 differs only in the token bytes, below)::

    ROOT/manifest.json                  written last, atomically; see `load_manifest`
    ROOT/{split}/shard-NNNNNN.tar       plain (uncompressed) POSIX ustar, a standard WebDataset shard
    ROOT/{split}/shard-NNNNNN.idx       little-endian int64 array, one row per sample:
                                        (json_offset, json_size, tokens_offset, tokens_size),
                                        byte offsets of the member *data* inside the tar

Each sample is two tar members sharing the key ``{split}-{id:09d}`` (``id`` = the sample's index in
its split, stable across reruns and worker counts):

- ``KEY.json``: UTF-8 JSON metadata (sorted keys): id, split, chrom, start, end (0-based,
  half-open), strand ("+"), length, n_fraction, assembly, fasta_sha256.
- ``KEY.tokens.zst``: one zstd frame holding ``length`` uint8 bytes: the CaduceusTokenizer id of each
  base (A=7 C=8 G=9 T=10 N=11), plus ``SOFTMASK_FLAG`` (16) where the FASTA had the base in lower case
  (a soft-masked repeat), so 23..27 for a..n. Version 1 shards hold the ids alone (case dropped).
  `token_ids` and `softmasked` split the bytes; readers of ids call `token_ids` on either version.

Tar headers are deterministic (mtime 0, uid/gid 0, mode 0644, no user names) so a shard is a pure
function of its samples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

FORMAT_NAME = "caduceus-dist-shards"
FORMAT_VERSION = 2  # written; READABLE_VERSIONS are read
READABLE_VERSIONS = (1, 2)
SOFTMASK_FLAG = 0x10  # added to a token id where the base was lower case (soft-masked); ids stay below it
MANIFEST_NAME = "manifest.json"
JSON_SUFFIX = ".json"
TOKENS_SUFFIX = ".tokens.zst"
INDEX_COLUMNS = 4  # json_offset, json_size, tokens_offset, tokens_size
TAR_BLOCK = 512


def token_ids(stored: np.ndarray) -> np.ndarray:
    """Token ids of stored token bytes (the soft-mask flag removed; a no-op on version 1 shards)."""
    return stored & (SOFTMASK_FLAG - 1)


def softmasked(stored: np.ndarray) -> np.ndarray:
    """Whether each stored base was lower case in the FASTA (always False in version 1 shards)."""
    return (stored & SOFTMASK_FLAG) != 0


class ShardFormatError(ValueError):
    """A shard, index or manifest is missing, corrupt or of an unknown format; the message names it."""


def sample_key(split: str, sample_id: int) -> str:
    return f"{split}-{sample_id:09d}"


def shard_name(shard_number: int) -> str:
    return f"shard-{shard_number:06d}"


def write_index(path: str | os.PathLike, rows: np.ndarray) -> None:
    Path(path).write_bytes(np.ascontiguousarray(rows, dtype="<i8").tobytes())


def read_index(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ShardFormatError(f"shard index {path} is missing; rerun data_prep/shard_genome.py on this dataset") from None
    if len(raw) % (8 * INDEX_COLUMNS):
        raise ShardFormatError(f"shard index {path} is truncated ({len(raw)} bytes is not a whole number of rows)")
    return np.frombuffer(raw, dtype="<i8").reshape(-1, INDEX_COLUMNS)


@dataclass(frozen=True)
class Sample:
    meta: dict
    tokens: np.ndarray  # uint8 token ids


class ShardReader:
    """O(1) random access to sample k of one shard through its index (positional reads, no tar scan)."""

    def __init__(self, tar_path: str | os.PathLike, index_path: str | os.PathLike):
        self.tar_path = Path(tar_path)
        self.index = read_index(index_path)
        try:
            self._fd = os.open(self.tar_path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardFormatError(f"shard {self.tar_path} is missing") from None
        self._size = os.fstat(self._fd).st_size
        if len(self.index) and int(self.index[-1, 2] + self.index[-1, 3]) > self._size:
            raise ShardFormatError(f"shard {self.tar_path} is truncated: its index points past its end ({self._size} bytes)")
        self._decompressor = zstandard.ZstdDecompressor()

    def __len__(self) -> int:
        return len(self.index)

    def _pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise ShardFormatError(f"shard {self.tar_path} is truncated at byte {offset + len(data)}")
        return data

    def read_meta(self, k: int) -> dict:
        json_off, json_size, _, _ = (int(v) for v in self.index[k])
        return json.loads(self._pread(json_off, json_size))

    def read_tokens(self, k: int) -> np.ndarray:
        _, _, tok_off, tok_size = (int(v) for v in self.index[k])
        try:
            raw = self._decompressor.decompress(self._pread(tok_off, tok_size))
        except zstandard.ZstdError as exc:
            raise ShardFormatError(f"shard {self.tar_path}: sample {k} does not decompress ({exc})") from None
        return np.frombuffer(raw, dtype=np.uint8)

    def read(self, k: int) -> Sample:
        return Sample(self.read_meta(k), self.read_tokens(k))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


def load_manifest(root: str | os.PathLike) -> dict:
    """Read and validate ROOT/manifest.json (format name and version, one entry per split)."""
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardFormatError(
            f"{path} not found: {root} is not a finished shard directory (run data_prep/shard_genome.py)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ShardFormatError(f"{path} is not valid JSON ({exc})") from None
    except OSError as exc:  # a permission, a stale network mount
        raise ShardFormatError(f"cannot read {path} ({exc.strerror or exc}): check the path and its filesystem") from None
    if manifest.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{path}: key 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ShardFormatError(
            f"{path}: key 'format_version' is {manifest.get('format_version')!r}; this caduceus-dist reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}. Reshard with this version of data_prep/shard_genome.py"
        )
    if not isinstance(manifest.get("splits"), dict):
        raise ShardFormatError(f"{path}: key 'splits' is missing")
    return manifest
