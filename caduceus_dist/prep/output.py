"""Where the sharder's bytes land: shards written crash-safely and journaled, and the output directory's state.

Workers pack runs of samples into tar-member blobs (`pack_members`); the main thread appends them.
A shard is written as `.shard-NNNNNN.tar.partial` (+ `.idx`), fsynced, renamed, and then journaled with
its sha256 in `OUT/.shard_genome/journal.jsonl`. A rerun trusts a journaled (or manifest-listed) shard
only if its sha256 still matches, so a crash at any point costs at most the shards in progress. The
arguments of the run that made a directory are kept in `OUT/.shard_genome/args.json` (and later in the
manifest), so a directory made with other arguments is never silently mixed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from caduceus_dist.fsio import atomic_write, fsync_path, sha256_file
from caduceus_dist.shard_format import INDEX_COLUMNS, MANIFEST_NAME, TAR_BLOCK, shard_name, write_index

STATE_DIR = ".shard_genome"
PARTIAL_SUFFIX = ".partial"
LOCATION_ARGS = ("fasta", "bed")  # input paths: the sha256 entries decide whether the input is the same


class ShardingError(RuntimeError):
    """The run cannot go on (output directory, arguments, strict-mode findings); the message says what to do."""


# ---------------------------------------------------------------------------------------------- tar members
# A worker packs a whole run of samples into one blob of tar members, so the main thread only appends
# blobs; headers are stdlib `tarfile` headers with the deterministic fields of docs/shard-format.md.

TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads a closed archive to a whole number of 20-block records
TAR_NAME_BYTES = 100  # a name that fits the ustar name field: the header is exactly one block


def tar_member(name: str, data) -> tuple[bytes, object, bytes]:
    """Header, data and zero padding of one ustar member (`data`: any bytes-like object)."""
    if len(name.encode()) > TAR_NAME_BYTES:
        raise ShardingError(f"tar member name {name!r} is longer than {TAR_NAME_BYTES} bytes; use a shorter split name")
    size = memoryview(data).nbytes
    info = tarfile.TarInfo(name)  # mode 0644, uid/gid 0, mtime 0, no user or group names
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"), data, bytes(-size % TAR_BLOCK)


def pack_members(members: list[tuple[str, object]]) -> tuple[bytes, np.ndarray]:
    """Tar members back to back in one blob, and each member's (data offset, size) within the blob."""
    parts, places, offset = [], [], 0
    for name, data in members:
        header, data, padding = tar_member(name, data)
        size = memoryview(data).nbytes
        places.append((offset + TAR_BLOCK, size))
        parts += (header, data, padding)
        offset += TAR_BLOCK + size + len(padding)
    return b"".join(parts), np.asarray(places, dtype="<i8").reshape(-1, 2)


class _OpenShard:
    """A shard being written: blobs appended to its partial tar, hashed on the way (no reread at the end)."""

    def __init__(self, tar: Path, number: int):
        self.number, self.samples, self.offset = number, 0, 0
        self.fh = open(tar, "wb")  # noqa: SIM115 (closed by close())
        self.digest = hashlib.sha256()
        self.rows: list[np.ndarray] = []

    def append(self, blob: bytes, places: np.ndarray) -> None:
        self.fh.write(blob)
        self.digest.update(blob)
        rows = places.reshape(-1, INDEX_COLUMNS).copy()
        rows[:, 0::2] += self.offset  # member offsets within the shard, not the blob; sizes unchanged
        self.rows.append(rows)
        self.samples += len(rows)
        self.offset += len(blob)

    def close(self) -> np.ndarray:
        """End the archive as tarfile does (two zero blocks, then zeros to a whole record); fsync; the index rows."""
        end = self.offset + 2 * TAR_BLOCK
        trailer = bytes(2 * TAR_BLOCK + -end % TAR_RECORD)
        self.fh.write(trailer)
        self.digest.update(trailer)
        self.offset += len(trailer)
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        return np.concatenate(self.rows) if self.rows else np.empty((0, INDEX_COLUMNS), dtype="<i8")


class ShardSink:
    """Receives packed runs of samples in id order, one open shard per split; finished shards are journaled."""

    def __init__(self, root: Path, per_shard: int, journal: Path):
        self.root, self.per_shard, self.journal = root, per_shard, journal
        self.open: dict[str, _OpenShard] = {}
        self.written: dict[tuple[str, int], dict] = {}

    def _paths(self, split: str, number: int) -> tuple[Path, Path]:
        base = self.root / split / shard_name(number)
        return base.with_suffix(".tar"), base.with_suffix(".idx")

    def add(self, split: str, first_id: int, blob: bytes, places: np.ndarray) -> None:
        """Append samples `first_id`.. of `split`, packed by `pack_members` (the members of each sample, in order)."""
        number = first_id // self.per_shard
        current = self.open.get(split)
        if current is not None and current.number != number:
            self.finish(split)
            current = None
        if current is None:
            tar, _ = self._paths(split, number)
            tar.parent.mkdir(parents=True, exist_ok=True)
            current = self.open[split] = _OpenShard(_partial(tar), number)
        if first_id != number * self.per_shard + current.samples:
            raise ShardingError(f"internal error: split {split!r} sample {first_id} arrived out of order")
        current.append(blob, places)
        if current.samples == self.per_shard:
            self.finish(split)

    def finish(self, split: str) -> None:
        shard = self.open[split]  # stays "open" until renamed, so `abandon` can clean up after a crash
        tar, idx = self._paths(split, shard.number)
        rows = shard.close()
        write_index(_partial(idx), rows)
        fsync_path(_partial(idx))
        first_id = shard.number * self.per_shard
        entry = {
            "tar": f"{split}/{tar.name}", "index": f"{split}/{idx.name}", "samples": len(rows),
            "bytes": shard.offset, "sha256": shard.digest.hexdigest(),
            "index_sha256": sha256_file(_partial(idx)), "first_id": first_id,
            "last_id": first_id + len(rows) - 1,
        }
        os.replace(_partial(idx), idx)
        os.replace(_partial(tar), tar)
        del self.open[split]
        # No directory/journal fsync here: a rerun trusts a journaled shard only if its sha256 matches,
        # so a journal line that outlives its file after a power cut just means the shard is redone.
        with open(self.journal, "a") as fh:
            fh.write(json.dumps({"split": split, "shard": shard.number, **entry}, sort_keys=True) + "\n")
        self.written[(split, shard.number)] = entry

    def finish_all(self) -> None:
        for split in list(self.open):
            self.finish(split)

    def abandon(self) -> None:
        """After an error: drop the half-written shards, keep every finished one.

        Every partial file under the root goes, not only those of `self.open`: a Ctrl-C can land after
        a shard's file is created and before the sink has recorded it."""
        for shard in self.open.values():
            with contextlib.suppress(OSError):
                shard.fh.close()
        self.open.clear()
        remove_partial_files(self.root)


def _partial(path: Path) -> Path:
    return path.with_name("." + path.name + PARTIAL_SUFFIX)


def remove_partial_files(root: Path) -> None:
    """Unlink the half-written shard files (`split/.name.partial`); one writer owns a root at a time."""
    for partial in root.glob(f"*/.*{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)


class OutputDir:
    """The output root: argument check, journal of finished shards, cleanup of partial files."""

    def __init__(self, root: Path, identity: dict):
        self.root, self.identity = root, identity
        self.state = root / STATE_DIR
        self.journal = self.state / "journal.jsonl"

    def write_error(self, action: str, exc: OSError) -> ShardingError:
        return ShardingError(
            f"cannot {action} ({exc.strerror or exc}); choose a writable --out with free space. "
            "Shards finished so far are kept; rerun with the same arguments to resume"
        )

    def prepare(self, overwrite: bool) -> dict[tuple[str, int], dict]:
        """Create or reuse the root; return the finished shards that can be kept (sha256 checked)."""
        if self.root.exists() and not self.root.is_dir():
            raise ShardingError(f"--out {self.root} exists and is not a directory; choose another --out")
        previous = self._previous_args()
        changed = sorted(k for k in (previous or {}).keys() | self.identity.keys()
                         if k not in LOCATION_ARGS and (previous or {}).get(k) != self.identity.get(k))
        if previous is not None and changed:
            if not overwrite and self._has_shards():  # a run that wrote no shard yet is simply replaced
                raise ShardingError(
                    f"{self.root} holds shards made with different arguments ({', '.join(changed)} differ). "
                    "Pass --overwrite to replace them, or choose another --out"
                )
            self._remove_outputs()
        elif previous is None and self._has_shards() and not overwrite:
            raise ShardingError(
                f"{self.root} already holds shard files but no manifest or run state; "
                "pass --overwrite to replace them, or choose another --out"
            )
        elif previous is None and overwrite:
            self._remove_outputs()
        try:
            self.state.mkdir(parents=True, exist_ok=True)
            if not (self.state / "args.json").exists():
                atomic_write(self.state / "args.json", json.dumps(self.identity, sort_keys=True, indent=1))
        except OSError as exc:
            raise self.write_error(f"create the output directory {self.root}", exc) from None
        remove_partial_files(self.root)
        return self._kept_shards()

    def _previous_args(self) -> dict | None:
        for path in (self.root / MANIFEST_NAME, self.state / "args.json"):
            if path.exists():
                try:
                    data = json.loads(path.read_text())
                except (OSError, json.JSONDecodeError):
                    continue
                return data.get("args") if path.name == MANIFEST_NAME else data
        return None

    def _has_shards(self) -> bool:
        return any(self.root.glob("*/shard-*.tar"))

    def _remove_outputs(self) -> None:
        for pattern in ("*/shard-*.tar", "*/shard-*.idx", f"*/.*{PARTIAL_SUFFIX}", f"{STATE_DIR}/*", MANIFEST_NAME):
            for path in self.root.glob(pattern):
                path.unlink()
        for directory in [self.state, *self.root.glob("*/")]:
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()

    def _kept_shards(self) -> dict[tuple[str, int], dict]:
        candidates: dict[tuple[str, int], dict] = {}
        manifest = self.root / MANIFEST_NAME
        if manifest.exists():
            for split, info in json.loads(manifest.read_text())["splits"].items():
                for number, entry in enumerate(info["shards"]):
                    candidates[(split, number)] = entry
        if self.journal.exists():
            for line in self.journal.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: that shard is simply redone
                candidates[(entry.pop("split"), entry.pop("shard"))] = entry
        return {key: entry for key, entry in candidates.items() if self._intact(entry)}

    def _intact(self, entry: dict) -> bool:
        tar, idx = self.root / entry["tar"], self.root / entry["index"]
        return (tar.exists() and idx.exists() and sha256_file(tar) == entry["sha256"]
                and sha256_file(idx) == entry["index_sha256"])

    def finished_manifest(self) -> dict | None:
        """The manifest of a finished earlier run with exactly these arguments whose shards all verify."""
        path = self.root / MANIFEST_NAME
        if not path.exists() or self.state.exists():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if manifest.get("args") != self.identity:
            return None
        entries = [entry for info in manifest["splits"].values() for entry in info["shards"]]
        return manifest if all(self._intact(entry) for entry in entries) else None

    def write_manifest(self, manifest: dict) -> None:
        for split in manifest["splits"]:
            if (self.root / split).is_dir():
                fsync_path(self.root / split)  # the shard renames are durable before the manifest names them
        atomic_write(self.root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        self.journal.unlink(missing_ok=True)
        (self.state / "args.json").unlink(missing_ok=True)
        self.state.rmdir()
