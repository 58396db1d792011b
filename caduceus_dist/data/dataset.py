"""One split of a shard directory: start-up verification, sample id -> window tokens.

The shards of the split are checked when it is opened (before step 0), so that a bad file stops the job
at once with its name. In a job of several ranks each rank checks an equal share of the bytes and one
gather tells every rank every problem, so `on_corrupt: skip` drops the *same* shards everywhere (the data
order is computed from the surviving windows) and an error is raised by all ranks together, never by one
while the others wait. `verify: sha256` hashes each shard (about 1 s per GB, divided among the ranks);
`verify: size` checks sizes and the (small) member indexes only. Decoding errors found later (a shard
changed under a running job) always raise, naming the shard and sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from caduceus_dist.distributed import gather_object, rank_and_world
from caduceus_dist.fsio import atomic_write, balanced_shares, file_mismatch, sha256_file
from caduceus_dist.shard_format import (
    RunsError,
    ShardFormatError,
    ShardReader,
    decode_crops,
    load_manifest,
    read_index,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardEntry:
    tar: Path
    index: Path
    first_id: int
    samples: int


def _check_shard(root: Path, entry: dict, verify: str, version: int, window: int) -> None:
    tar, index = root / entry["tar"], root / entry["index"]
    # the size first (cheap), the content of the tar last (the expensive read)
    mismatch = file_mismatch(tar, entry["bytes"], entry["sha256"], "size")
    if mismatch is not None and mismatch[0] == "missing":
        raise ShardFormatError(f"shard {tar} is missing (listed in {root}/manifest.json); restore it or "
                               f"rerun data_prep/shard_genome.py")
    if mismatch is not None:
        raise ShardFormatError(f"shard {tar} is {mismatch[1]} bytes but the manifest says {entry['bytes']}: the file "
                               f"is truncated or was modified; rerun data_prep/shard_genome.py")
    if not index.exists():
        raise ShardFormatError(f"shard index {index} is missing; rerun data_prep/shard_genome.py")
    if sha256_file(index) != entry["index_sha256"]:
        raise ShardFormatError(f"shard index {index}: sha256 does not match the manifest; rerun data_prep/shard_genome.py")
    rows = read_index(index, version)
    if len(rows) != entry["samples"]:
        raise ShardFormatError(f"shard index {index} has {len(rows)} rows but the manifest says {entry['samples']} samples")
    wrong_length = np.flatnonzero(rows[:, 3] != -(-window // 4)) if version >= 3 else ()  # 2-bit size = length
    if len(wrong_length):
        k = int(wrong_length[0])
        raise ShardFormatError(f"shard {tar}: sample {k} has room for {4 * int(rows[k, 3])} bases, the manifest window "
                               f"is {window}; rerun data_prep/shard_genome.py")
    if verify == "sha256" and sha256_file(tar) != entry["sha256"]:
        raise ShardFormatError(f"shard {tar}: sha256 does not match the manifest (corrupted on disk or in transfer); "
                               f"restore it or rerun data_prep/shard_genome.py")


def stamp_dir() -> Path:
    """Where verified stamps live: $CADUCEUS_CACHE/verified, else ~/.cache/caduceus_dist/verified."""
    return Path(os.environ.get("CADUCEUS_CACHE") or Path.home() / ".cache" / "caduceus_dist") / "verified"


class VerifiedStamp:
    """The shards of one shard directory whose sha256 matched, with the size and mtime they had then.

    A requeued job re-hashing ~10 GB on every rank costs minutes; a shard whose size and mtime are
    what they were when it was hashed is trusted (its index is still hashed, and its size checked).
    Keyed by the directory's absolute path and its manifest, so another copy or a reshard starts
    afresh. Written by the first rank of each host; an unwritable cache only costs the next start.
    """

    def __init__(self, root: Path, manifest_digest: str):
        key = hashlib.sha256(f"{root.resolve()}\n{manifest_digest}".encode()).hexdigest()[:32]
        self.path = stamp_dir() / f"{key}.json"
        try:
            self.verified: dict[str, list[int]] = json.loads(self.path.read_text())["verified"]
        except (OSError, ValueError, KeyError, TypeError):
            self.verified = {}

    @staticmethod
    def signature(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def trusts(self, root: Path, tar: str) -> bool:
        try:
            return self.verified.get(tar) == self.signature(root / tar)
        except OSError:
            return False

    def record(self, root: Path, tars: list[str]) -> None:
        try:
            self.verified.update({tar: self.signature(root / tar) for tar in tars})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps({"root": str(root.resolve()), "verified": self.verified}))
        except OSError as err:
            log.warning("cannot write the verified-shard stamp %s (%s): the next start hashes the shards again",
                        self.path, err)


def _agreed_problems(root: Path, split: str, entries: list[dict], verify: str, version: int, window: int,
                     stamp: VerifiedStamp | None) -> dict[int, str]:
    """Shard index -> what is wrong with it, the same on every rank: each rank checks its share (by bytes)
    and one gather merges them (without other ranks, this process checks every shard). Shards the
    stamp trusts get the size and index checks only."""
    rank, world = rank_and_world()
    sizes = {str(i): int(entry.get("bytes", 0)) for i, entry in enumerate(entries)}
    share = [int(i) for i in balanced_shares(sizes, world)[rank]]
    mine = {}
    for i in share:
        entry = entries[i]
        try:
            missing = [k for k in ("tar", "index", "samples", "bytes", "sha256", "index_sha256", "first_id")
                       if k not in entry]
            if missing:
                raise ShardFormatError(f"{root}/manifest.json: splits.{split}.shards[{i}] lacks key(s) {missing}")
            trusted = verify == "sha256" and stamp is not None and stamp.trusts(root, entry["tar"])
            _check_shard(root, entry, "size" if trusted else verify, version, window)
        except ShardFormatError as err:
            mine[i] = str(err)
    return {i: problem for part in gather_object(mine) for i, problem in sorted(part.items())}


def _agreed_manifest(root: Path) -> tuple[dict, str, bool]:
    """The manifest every rank read, or one error on every rank naming each rank that could not read it
    (a node with a stale mount must not leave the others waiting at the next collective) or that reads
    a different one (a node with another copy of the shards). Also: the manifest's digest, and whether
    this rank is the first of its host (it writes the host's verified stamp)."""
    manifest, error = None, None
    try:
        manifest = load_manifest(root)
    except ShardFormatError as err:
        error = str(err)
    digest = None if manifest is None else hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    reports = gather_object((socket.gethostname(), error, digest))
    errors = {e for _, e, _ in reports if e}
    if len(errors) == 1 and all(e for _, e, _ in reports):  # the same problem everywhere: say it once
        raise ShardFormatError(errors.pop())
    if errors:
        raise ShardFormatError("; ".join(f"rank {r} on {host}: {e}" for r, (host, e, _) in enumerate(reports) if e))
    differing = [f"rank {r} on {host}" for r, (host, _, d) in enumerate(reports) if d != reports[0][2]]
    if differing:
        raise ShardFormatError(f"{root}/manifest.json differs between ranks: {', '.join(differing)} read another "
                               f"one than rank 0 on {reports[0][0]}; give every node the same shard directory")
    rank, _ = rank_and_world()
    hosts = [host for host, _, _ in reports]
    return manifest, digest, hosts.index(hosts[rank]) == rank


class ShardSplit:
    """The surviving shards of one split and O(1) access to any window or crop by its sample id."""

    WINDOW_CACHE = 64  # decompressed windows kept (versions 1 and 2 only)

    def __init__(self, root: str | Path, split: str, verify: str = "sha256", on_corrupt: str = "error",
                 use_stamps: bool = True):
        self.root = Path(root)
        self.manifest, digest, writes_stamp = _agreed_manifest(self.root)
        splits = self.manifest["splits"]
        if split not in splits:
            raise ShardFormatError(f"{self.root}/manifest.json has no split '{split}' (it has {sorted(splits)}); "
                                   f"set data.split or reshard")
        if not isinstance(self.manifest.get("window"), int) or self.manifest["window"] <= 0:
            raise ShardFormatError(f"{self.root}/manifest.json: key 'window' is {self.manifest.get('window')!r}, "
                                   f"expected a positive integer")
        self.split, self.window = split, int(self.manifest["window"])
        entries = splits[split].get("shards", [])
        stamp = VerifiedStamp(self.root, digest) if use_stamps and verify == "sha256" else None
        self.version = int(self.manifest["format_version"])
        problems = _agreed_problems(self.root, split, entries, verify, self.version, self.window, stamp)
        if stamp is not None and writes_stamp:
            stamp.record(self.root, [e["tar"] for i, e in enumerate(entries) if i not in problems])
        self.shards: list[ShardEntry] = []
        self.skipped: list[tuple[str, str]] = []  # (tar path, reason)
        for i, entry in enumerate(entries):
            if i in problems:
                if on_corrupt != "skip":
                    raise ShardFormatError(problems[i])
                log.warning("data.on_corrupt=skip: skipping %s (%s)", entry.get("tar"), problems[i])
                self.skipped.append((str(entry.get("tar")), problems[i]))
                continue
            self.shards.append(ShardEntry(self.root / entry["tar"], self.root / entry["index"],
                                          int(entry["first_id"]), int(entry["samples"])))
        self.sample_ids = (np.concatenate([np.arange(s.first_id, s.first_id + s.samples) for s in self.shards])
                           if self.shards else np.zeros(0, dtype=np.int64))
        self._first_ids = np.array([s.first_id for s in self.shards], dtype=np.int64)
        self._readers: dict[int, ShardReader] = {}
        self._windows: dict[int, np.ndarray] = {}  # versions 1 and 2: the last decompressed windows

    def _reader(self, shard: int) -> ShardReader:
        if shard not in self._readers:
            entry = self.shards[shard]
            self._readers[shard] = ShardReader(entry.tar, entry.index, self.version)
        return self._readers[shard]

    def _locate(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, sample number within the shard) of each sample id."""
        shard = np.searchsorted(self._first_ids, sample_ids, side="right") - 1
        return shard, sample_ids - self._first_ids[shard]

    def read_window(self, sample_id: int) -> np.ndarray:
        """The stored window (uint8 token ids, soft-mask flag kept) of a sample id; O(1) through the shard's index."""
        shard, k = (int(v[0]) for v in self._locate(np.array([sample_id])))
        if self.version >= 3:
            return self._reader(shard).read_span(k, 0, self.window, self.window)
        cached = self._windows.pop(sample_id, None)
        tokens = self._reader(shard).read_tokens(k) if cached is None else cached
        if len(tokens) != self.window:
            raise ShardFormatError(f"shard {self.shards[shard].tar}: sample {sample_id} has {len(tokens)} tokens, "
                                   f"the manifest window is {self.window}")
        self._windows[sample_id] = tokens  # most recent last
        while len(self._windows) > self.WINDOW_CACHE:
            self._windows.pop(next(iter(self._windows)))
        return tokens

    def read_crops(self, sample_ids: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
        """Stored bytes of crops (window sample_ids[i] at offsets[i], out.shape[1] bases) into the rows of `out`.

        Version 3 reads only the crops' bases and the runs that may overlap them (three or four positional
        reads per crop, each bounded by the crop) and decodes the batch at once; versions 1 and 2 decompress
        whole windows (the last few are kept).
        """
        rows, length = out.shape
        if self.version < 3:
            for row in range(rows):
                out[row] = self.read_window(int(sample_ids[row]))[offsets[row]:offsets[row] + length]
            return
        shards, ks = self._locate(np.asarray(sample_ids, dtype=np.int64))
        if length % 4:  # crops not on whole packed bytes (short test lengths): one at a time
            for row, (shard, k, offset) in enumerate(zip(shards.tolist(), ks.tolist(), np.asarray(offsets).tolist(),
                                                         strict=True)):
                self._reader(shard).read_span(k, offset, length, self.window, out[row])
            return
        packed, n_runs, soft_runs = [], [], []
        for shard, k, offset in zip(shards.tolist(), ks.tolist(), np.asarray(offsets).tolist(), strict=True):
            bases, n_pairs, soft_pairs = self._reader(shard).crop_places(k, offset, length, self.window)
            packed.append(bases)
            n_runs.append(n_pairs)
            soft_runs.append(soft_pairs)
        runs, members = [], []
        for pieces in (n_runs, soft_runs):
            runs.append(np.frombuffer(b"".join(pieces), dtype="<i4").astype(np.int64).reshape(-1, 2))
            members.append(np.repeat(np.arange(rows), [len(piece) // 8 for piece in pieces]))
        try:
            decode_crops(np.frombuffer(b"".join(packed), dtype=np.uint8).reshape(rows, length // 4), tuple(runs),
                         tuple(members), np.asarray(offsets, dtype=np.int64), self.window, out)
        except RunsError as err:
            raise ShardFormatError(f"shard {self.shards[int(shards[err.member])].tar}: sample {int(ks[err.member])} has a "
                                   f"corrupt runs member ({err}); restore the shard or rerun data_prep/shard_genome.py") from None

    def __getstate__(self):  # file descriptors are per process (DataLoader workers)
        state = self.__dict__.copy()
        state["_readers"], state["_windows"] = {}, {}
        return state
