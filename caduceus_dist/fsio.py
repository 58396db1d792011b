"""Files that survive crashes and say when they changed: fsync, atomic writes, sha256, verification.

One home for what the sharder, the loader, the checkpoint manager, the config writer and the model
export all need (docs/resume.md says why each step is there): a writer either leaves the old file or the
complete new one, and a reader checks a file against the size and sha256 recorded when it was written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

VERIFY_MODES = ("sha256", "size")  # what a start-up check reads: every byte, or only the sizes
HASH_CHUNK = 8 << 20


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file, or a directory so that renames and new entries in it survive a crash (POSIX)."""
    fd = os.open(Path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def creation_mode() -> int:
    """The mode `open()` gives a new file here: 0666 less the process umask (read without changing it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    return 0o644


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; once the body has written it, fsync it and rename it over
    `path`. Readers see the old file or the new one, never a torn one; a failure leaves no temporary."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.chmod(tmp, creation_mode())  # some writers (safetensors) create 0600: readable by the group, as usual
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` to `path` atomically and durably (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@dataclass(frozen=True)
class FileDigest:
    bytes: int
    sha256: str

    def as_dict(self) -> dict:
        return {"bytes": self.bytes, "sha256": self.sha256}


def _hash_stream(source, sink=None) -> FileDigest:
    """Read `source` to its end in chunks, hashing them (and writing them to `sink`, if given)."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink.write(chunk)
    return FileDigest(size, digest.hexdigest())


def file_digest(path: str | os.PathLike, fsync: bool = False) -> FileDigest:
    """Size and sha256 of one file; with `fsync`, also force it to stable storage first."""
    with open(path, "rb") as handle:
        if fsync:
            os.fsync(handle.fileno())
        return _hash_stream(handle)


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path).sha256


def copy_hashed(source: str | os.PathLike, target: str | os.PathLike) -> FileDigest:
    """Copy a file, hashing the bytes on the way (one read), and fsync the copy."""
    with open(source, "rb") as src, open(target, "wb") as dst:
        copied = _hash_stream(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    return copied


def balanced_shares(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Split files among `parts` ranks by bytes (largest first, each to the least-loaded rank), so one big
    file never shares a rank with the rest while others idle; the same split on every rank."""
    shares: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = loads.index(min(loads))
        shares[rank].append(name)
        loads[rank] += sizes[name]
    return shares


def file_mismatch(path: Path, expected_bytes: int, expected_sha256: str, verify: str) -> tuple[str, int] | None:
    """None when `path` matches its recorded size (and, with verify="sha256", its sha256); otherwise
    (what, size): what is "missing", "size" or "sha256". Callers word the message for their files."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing", 0
    if size != expected_bytes:
        return "size", size
    if verify == "sha256" and sha256_file(path) != expected_sha256:
        return "sha256", size
    return None
