"""Where the sharder's bytes land: shards written crash-safely and journaled, and the output directory's state.

A shard is written as `.shard-NNNNNN.tar.partial` (+ `.idx`), fsynced, renamed, and then journaled with
its sha256 in `OUT/.shard_genome/journal.jsonl`. A rerun trusts a journaled (or manifest-listed) shard
only if its sha256 still matches, so a crash at any point costs at most the shards in progress. The
arguments of the run that made a directory are kept in `OUT/.shard_genome/args.json` (and later in the
manifest), so a directory made with other arguments is never silently mixed.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from caduceus_dist.data.shard_format import (
    MANIFEST_NAME,
    ShardWriter,
    sample_key,
    sha256_file,
    shard_name,
    write_index,
)
from caduceus_dist.fsio import fsync_path

STATE_DIR = ".shard_genome"
PARTIAL_SUFFIX = ".partial"
LOCATION_ARGS = ("fasta", "bed")  # input paths: the sha256 entries decide whether the input is the same


class ShardingError(RuntimeError):
    """The run cannot go on (output directory, arguments, strict-mode findings); the message says what to do."""



def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


class ShardSink:
    """Receives compressed samples in id order, one open shard per split; finished shards are journaled."""

    def __init__(self, root: Path, per_shard: int, journal: Path):
        self.root, self.per_shard, self.journal = root, per_shard, journal
        self.open: dict[str, tuple[int, ShardWriter]] = {}
        self.written: dict[tuple[str, int], dict] = {}

    def _paths(self, split: str, number: int) -> tuple[Path, Path]:
        base = self.root / split / shard_name(number)
        return base.with_suffix(".tar"), base.with_suffix(".idx")

    def add(self, meta: dict, compressed: bytes) -> None:
        split, sample_id = meta["split"], meta["id"]
        number = sample_id // self.per_shard
        current = self.open.get(split)
        if current is not None and current[0] != number:
            self.finish(split)
            current = None
        if current is None:
            tar, _ = self._paths(split, number)
            tar.parent.mkdir(parents=True, exist_ok=True)
            current = (number, ShardWriter(_partial(tar)))
            self.open[split] = current
        current[1].add_compressed(sample_key(split, sample_id), meta, compressed)
        if (sample_id + 1) % self.per_shard == 0:
            self.finish(split)

    def finish(self, split: str) -> None:
        number, writer = self.open[split]  # stays "open" until renamed, so `abandon` can clean up after a crash
        tar, idx = self._paths(split, number)
        rows = writer.close()
        write_index(_partial(idx), rows)
        for path in (_partial(tar), _partial(idx)):
            fsync_path(path)
        first_id = number * self.per_shard
        entry = {
            "tar": f"{split}/{tar.name}", "index": f"{split}/{idx.name}", "samples": len(rows),
            "bytes": _partial(tar).stat().st_size, "sha256": sha256_file(_partial(tar)),
            "index_sha256": sha256_file(_partial(idx)), "first_id": first_id, "last_id": first_id + len(rows) - 1,
        }
        os.replace(_partial(idx), idx)
        os.replace(_partial(tar), tar)
        del self.open[split]
        # No directory/journal fsync here: a rerun trusts a journaled shard only if its sha256 matches,
        # so a journal line that outlives its file after a power cut just means the shard is redone.
        with open(self.journal, "a") as fh:
            fh.write(json.dumps({"split": split, "shard": number, **entry}, sort_keys=True) + "\n")
        self.written[(split, number)] = entry

    def finish_all(self) -> None:
        for split in list(self.open):
            self.finish(split)

    def abandon(self) -> None:
        """After an error: drop the half-written shards (their partial files), keep every finished one."""
        for split, (number, writer) in list(self.open.items()):
            for path in self._paths(split, number):
                _partial(path).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                writer.abort()
        self.open.clear()


def _partial(path: Path) -> Path:
    return path.with_name("." + path.name + PARTIAL_SUFFIX)


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
                write_atomic(self.state / "args.json", json.dumps(self.identity, sort_keys=True, indent=1))
        except OSError as exc:
            raise self.write_error(f"create the output directory {self.root}", exc) from None
        for partial in self.root.glob(f"*/.*{PARTIAL_SUFFIX}"):
            partial.unlink()
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
        write_atomic(self.root / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        self.journal.unlink(missing_ok=True)
        (self.state / "args.json").unlink(missing_ok=True)
        self.state.rmdir()
