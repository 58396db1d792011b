"""The on-disk shard format: the one contract between preparation (`caduceus_dist.prep`, the writer) and
loading (`caduceus_dist.data`, the reader). docs/shard-format.md describes it for users.

Layout of a dataset root (format version 3; versions 1 and 2 are read too, see below)::

    ROOT/manifest.json                  written last, atomically; see `load_manifest`
    ROOT/{split}/shard-NNNNNN.tar       plain (uncompressed) POSIX ustar, a standard WebDataset shard
    ROOT/{split}/shard-NNNNNN.idx       little-endian int64 array, one row per sample: (offset, size) of
                                        each member's *data* inside the tar, in member order

Each sample is tar members sharing the key ``{split}-{id:09d}`` (``id`` = the sample's index in its
split, stable across reruns and worker counts):

- ``KEY.json``: UTF-8 JSON metadata (sorted keys): id, split, chrom, start, end (0-based,
  half-open), strand ("+"), length, n_fraction, assembly, fasta_sha256.
- ``KEY.bases.2bit`` (version 3): ceil(length / 4) bytes, base i in bits 2*(i % 4) of byte i // 4,
  A=0 C=1 G=2 T=3 (an N is stored as A and listed in the runs). Any span of bases is one read away,
  and decoding costs a table lookup per byte, so a crop of L bases costs L bases of work, whatever the
  window (docs/shard-format.md §1 measures the zstd frames this replaced).
- ``KEY.runs.i32`` (version 3): little-endian int32: the number of N runs and of soft-masked runs; a
  block table, for each b in 0..ceil(length / RUN_BLOCK): the index of the first N run and of the first
  soft-masked run ending after base b * RUN_BLOCK; then the N runs and the soft-masked (lower-case in
  the FASTA) runs as (start, end) pairs, 0-based half-open, sorted and disjoint. A crop reads only the
  runs the table says may overlap it.
- ``KEY.tokens.zst`` (versions 1 and 2, read only): one zstd frame of ``length`` stored bytes.

A stored byte, what readers get: the CaduceusTokenizer id of the base (A=7 C=8 G=9 T=10 N=11) plus
``SOFTMASK_FLAG`` (16) where the FASTA had it in lower case (version 1 dropped the case).
`token_ids` and `softmasked` split it.

Tar headers are deterministic (mtime 0, uid/gid 0, mode 0644, no user names) so a shard is a pure
function of its samples.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from caduceus_dist.model.tokenizer import A_ID, C_ID, G_ID, N_ID, T_ID

FORMAT_NAME = "caduceus-dist-shards"
FORMAT_VERSION = 3  # written; READABLE_VERSIONS are read
READABLE_VERSIONS = (1, 2, 3)
SOFTMASK_FLAG = 0x10  # added to a token id where the base was lower case (soft-masked); ids stay below it
MANIFEST_NAME = "manifest.json"
JSON_SUFFIX = ".json"
TOKENS_SUFFIX = ".tokens.zst"  # versions 1 and 2
BASES_SUFFIX, RUNS_SUFFIX = ".bases.2bit", ".runs.i32"  # version 3
MEMBER_SUFFIXES = {1: (JSON_SUFFIX, TOKENS_SUFFIX), 2: (JSON_SUFFIX, TOKENS_SUFFIX),
                   3: (JSON_SUFFIX, BASES_SUFFIX, RUNS_SUFFIX)}
INDEX_COLUMNS = 2 * len(MEMBER_SUFFIXES[FORMAT_VERSION])  # (offset, size) per member, as written today
TAR_BLOCK = 512
RUN_BLOCK = 4096  # bases between the block-table entries of a runs member
_CODE_TO_ID = np.array([A_ID, C_ID, G_ID, T_ID], dtype=np.uint8)
_ID_TO_CODE = np.zeros(256, dtype=np.uint8)
_ID_TO_CODE[_CODE_TO_ID] = np.arange(4, dtype=np.uint8)
# packed byte -> its four token ids, lowest bits first; as one uint32 each (one gather per byte, not per base)
_UNPACK = _CODE_TO_ID[(np.arange(256, dtype=np.uint8)[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3]
_UNPACK32 = np.ascontiguousarray(_UNPACK).view(np.uint32).reshape(256)


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


def index_columns(version: int) -> int:
    return 2 * len(MEMBER_SUFFIXES[version])


def write_index(path: str | os.PathLike, rows: np.ndarray) -> None:
    Path(path).write_bytes(np.ascontiguousarray(rows, dtype="<i8").tobytes())


def read_index(path: str | os.PathLike, version: int = FORMAT_VERSION) -> np.ndarray:
    path = Path(path)
    columns = index_columns(version)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ShardFormatError(f"shard index {path} is missing; rerun data_prep/shard_genome.py on this dataset") from None
    if len(raw) % (8 * columns):
        raise ShardFormatError(f"shard index {path} is truncated ({len(raw)} bytes is not a whole number of rows)")
    return np.frombuffer(raw, dtype="<i8").reshape(-1, columns)


def _runs(mask: np.ndarray) -> list[np.ndarray]:
    """(start, end) pairs of the True runs of each row of a (n, length) bool array: a list of int64 (k, 2).

    One pass over the rows laid end to end with a False column between them, so each run's rising and
    falling edges come in order and never cross a row."""
    rows, length = mask.shape
    padded = np.zeros((rows, length + 1), dtype=bool)
    padded[:, :length] = mask
    flat = padded.reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # positions where a run starts or ends
    if flat[0]:
        edges = np.concatenate([[0], edges])
    row, column = np.divmod(edges, length + 1)
    pairs = column.reshape(-1, 2)
    return np.split(pairs, np.searchsorted(row[0::2], np.arange(1, rows)))


def _table_ints(length: int) -> int:
    """int32 entries of a runs member's block table: two per block boundary, RUN_BLOCK bases apart."""
    return 2 * (-(-length // RUN_BLOCK) + 1)


def encode_bases(stored: np.ndarray) -> list[tuple[bytes, bytes]]:
    """Version 3 members (bases.2bit, runs.i32) of each row of (n, length) stored bytes."""
    stored = np.asarray(stored, dtype=np.uint8)
    length = stored.shape[1]
    ids = token_ids(stored)
    codes = _ID_TO_CODE[ids]
    pad = -length % 4
    if pad:
        codes = np.pad(codes, ((0, 0), (0, pad)))
    codes = codes.reshape(len(stored), -1, 4)
    packed = codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6
    boundaries = np.arange(0, _table_ints(length) // 2) * RUN_BLOCK
    members = []
    for row, n_runs, soft_runs in zip(packed, _runs(ids == N_ID), _runs(softmasked(stored)), strict=True):
        # block b: the first N run and the first soft-masked run ending after base b * RUN_BLOCK
        table = np.column_stack([np.searchsorted(runs[:, 1], boundaries, side="right") for runs in (n_runs, soft_runs)])
        header = np.array([len(n_runs), len(soft_runs)], dtype="<i4")
        members.append((row.tobytes(), b"".join(a.astype("<i4").tobytes() for a in (header, table, n_runs, soft_runs))))
    return members


class RunsError(ValueError):
    """A malformed runs.i32 member; `member` says which of the crops decoded together it belongs to."""

    def __init__(self, member: int, why: str):
        super().__init__(why)
        self.member = member


def parse_runs(raw: bytes, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(N runs, soft-masked runs), each (k, 2) int64, of one whole runs.i32 member; ValueError if malformed."""
    values = np.frombuffer(raw[:len(raw) - len(raw) % 4], dtype="<i4").astype(np.int64)
    table = _table_ints(length)
    if len(raw) % 4 or len(values) < 2 or min(values[:2]) < 0 or len(values) != 2 + table + 2 * (values[0] + values[1]):
        raise ValueError("its run counts do not match its size")
    pairs = values[2 + table:].reshape(-1, 2)
    n_runs, soft_runs = pairs[:values[0]], pairs[values[0]:]
    for runs in (n_runs, soft_runs):
        _check_runs(runs[:, 0], runs[:, 1], length)
        if np.any(runs[1:, 0] < runs[:-1, 1]):
            raise ValueError("its runs are unsorted or overlap")
    return n_runs, soft_runs


def _check_runs(starts: np.ndarray, ends: np.ndarray, length: int) -> None:
    bad = (starts < 0) | (ends <= starts) | (ends > length)
    if bad.any():
        raise RunsError(int(np.flatnonzero(bad)[0]), "a run is empty or outside the window")


def decode_crops(packed: np.ndarray, runs: tuple[np.ndarray, np.ndarray], members: tuple[np.ndarray, np.ndarray],
                 offsets: np.ndarray, window: int, out: np.ndarray) -> None:
    """Stored bytes of B crops of L bases (out: (B, L), L a multiple of 4) from their packed bytes (B, L / 4)
    and the runs that may overlap them: (N runs, soft-masked runs), each (k, 2) window coordinates, and the
    crop each run belongs to. Raises RunsError naming the crop whose runs are malformed."""
    rows, length = out.shape
    for pairs, member in zip(runs, members, strict=True):
        try:
            _check_runs(pairs[:, 0], pairs[:, 1], window)
        except RunsError as err:
            raise RunsError(int(member[err.member]), str(err)) from None
    out[:] = _UNPACK32[packed].view(np.uint8).reshape(rows, length)
    _mark_runs(out.reshape(-1), length, runs, members, offsets)


def _mark_runs(flat: np.ndarray, length: int, runs: tuple[np.ndarray, np.ndarray],
               members: tuple[np.ndarray, np.ndarray], offsets: np.ndarray) -> None:
    """Crops of `length` bases laid end to end in `flat`, crop m from base offsets[m] of its window: the N runs
    become N, the soft-masked runs get the flag (runs in window coordinates, `members` the crop of each)."""
    for kind, (pairs, member) in enumerate(zip(runs, members, strict=True)):
        first = member * length + np.clip(pairs[:, 0] - offsets[member], 0, length)  # clipped to the crop,
        last = member * length + np.clip(pairs[:, 1] - offsets[member], 0, length)  # as positions in `flat`
        covered = _positions(first, last)
        if kind:
            flat[covered] |= SOFTMASK_FLAG
        else:
            flat[covered] = N_ID


def _positions(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Every position of the half-open ranges [first, last) (empty ones allowed), as one index array: the cost
    is the bases covered, with no Python loop over the ranges."""
    lengths = np.maximum(last - first, 0)
    ends = np.cumsum(lengths)
    return np.repeat(first - ends + lengths, lengths) + np.arange(int(ends[-1]) if len(ends) else 0)


def decode_span(packed: np.ndarray, first_byte: int, n_runs: np.ndarray, soft_runs: np.ndarray, start: int,
                length: int, out: np.ndarray) -> None:
    """Stored bytes of bases [start, start + length) into `out`, from the packed bytes that begin at byte
    `first_byte` of the window and the window's runs."""
    shift = start - 4 * first_byte
    out[:] = _UNPACK32[packed].view(np.uint8)[shift:shift + length]
    _mark_runs(out, length, (n_runs, soft_runs), (np.zeros(len(n_runs), np.int64), np.zeros(len(soft_runs), np.int64)),
               np.array([start]))


def decode_members(bases: bytes, runs: bytes, length: int) -> np.ndarray:
    """The stored bytes of a version 3 sample from its two members (e.g. as WebDataset yields them:
    sample["bases.2bit"], sample["runs.i32"]) and its length (sample["json"]["length"])."""
    out = np.empty(length, dtype=np.uint8)
    decode_span(np.frombuffer(bases, dtype=np.uint8), 0, *parse_runs(runs, length), 0, length, out)
    return out


@dataclass(frozen=True)
class Sample:
    meta: dict
    tokens: np.ndarray  # uint8 stored bytes (token id, plus the soft-mask flag)


class ShardReader:
    """O(1) random access to sample k of one shard through its index (positional reads, no tar scan)."""

    def __init__(self, tar_path: str | os.PathLike, index_path: str | os.PathLike, version: int = FORMAT_VERSION):
        self.tar_path, self.version = Path(tar_path), version
        self.index = read_index(index_path, version)
        try:
            self._fd = os.open(self.tar_path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardFormatError(f"shard {self.tar_path} is missing") from None
        self._size = os.fstat(self._fd).st_size
        if len(self.index) and int(self.index[:, 0::2].max() + self.index[-1, -1]) > self._size:
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
        json_off, json_size = (int(v) for v in self.index[k, :2])
        return json.loads(self._pread(json_off, json_size))

    def runs(self, k: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        runs_off, runs_size = (int(v) for v in self.index[k, 4:6])
        try:
            return parse_runs(self._pread(runs_off, runs_size), length)
        except ValueError as exc:
            raise ShardFormatError(f"shard {self.tar_path}: sample {k} has a corrupt runs member ({exc}); "
                                   f"restore the shard or rerun data_prep/shard_genome.py") from None

    def crop_places(self, k: int, start: int, length: int, window: int) -> tuple[bytes, bytes, bytes]:
        """Version 3, start and length multiples of 4: the packed bytes of bases [start, start + length) of
        sample k, and its N and soft-masked runs that may overlap them ((start, end) int32 pairs), found
        through the runs member's block table: the reads are bounded by the crop, not the window."""
        runs_off, runs_size = (int(v) for v in self.index[k, 4:6])
        first_block, end_block = start // RUN_BLOCK, -(-(start + length) // RUN_BLOCK)
        head = struct.unpack(f"<{2 * end_block + 4}i", self._pread(runs_off, 8 * end_block + 16))
        n_count, soft_count = head[0], head[1]
        table = _table_ints(window)
        if n_count < 0 or soft_count < 0 or runs_size != 4 * (2 + table + 2 * (n_count + soft_count)):
            raise ShardFormatError(f"shard {self.tar_path}: sample {k} has a corrupt runs member (its run counts "
                                   f"do not match its size); restore the shard or rerun data_prep/shard_genome.py")
        pairs_off = runs_off + 4 * (2 + table)
        slices = []
        for kind, (count, before) in enumerate(((n_count, 0), (soft_count, n_count))):
            lo, hi = head[2 + 2 * first_block + kind], min(head[2 + 2 * end_block + kind] + 1, count)
            if not 0 <= lo <= count:
                raise ShardFormatError(f"shard {self.tar_path}: sample {k} has a corrupt runs member (its block "
                                       f"table points outside its runs); restore the shard or rerun data_prep/shard_genome.py")
            slices.append(self._pread(pairs_off + 8 * (before + lo), 8 * (hi - lo)) if hi > lo else b"")
        return self._packed(k, start, length), slices[0], slices[1]

    def _packed(self, k: int, start: int, length: int) -> bytes:
        """Version 3: the packed bytes holding bases [start, start + length) of sample k (from byte start // 4)."""
        bases_off, bases_size = (int(v) for v in self.index[k, 2:4])
        end_byte = -(-(start + length) // 4)
        if end_byte > bases_size:
            raise ShardFormatError(f"shard {self.tar_path}: sample {k} holds {4 * bases_size} bases at most, "
                                   f"bases {start}..{start + length} were asked for")
        return self._pread(bases_off + start // 4, end_byte - start // 4)

    def read_span(self, k: int, start: int, length: int, window: int, out: np.ndarray | None = None) -> np.ndarray:
        """Stored bytes of bases [start, start + length) of sample k, a window of `window` bases; version 3
        reads and decodes only those (and the window's runs)."""
        if out is None:
            out = np.empty(length, dtype=np.uint8)
        if self.version < 3:
            out[:] = self.read_tokens(k)[start:start + length]
            return out
        packed = np.frombuffer(self._packed(k, start, length), dtype=np.uint8)
        decode_span(packed, start // 4, *self.runs(k, window), start, length, out)
        return out

    def read_tokens(self, k: int) -> np.ndarray:
        """The whole sample's stored bytes."""
        if self.version >= 3:
            length = int(self.read_meta(k)["length"])
            return self.read_span(k, 0, length, length)
        tok_off, tok_size = (int(v) for v in self.index[k, 2:4])
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
