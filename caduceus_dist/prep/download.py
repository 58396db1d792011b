"""`shard_genome.py --download hg38`: fetch the reference pretraining inputs with resumable HTTP downloads.

Why resumable: hg38.ml.fa.gz is ~940 MB. Bytes land in `NAME.part`; a retry (after a dropped connection,
or a later rerun) asks for the rest with an HTTP Range request and appends, and the file is renamed to
its final name only once its size matches the server's.
"""

from __future__ import annotations

import http.client
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

# Spec 3.1: the files the reference Caduceus/HyenaDNA hg38 pretraining reads.
DOWNLOADS = {
    "hg38": {
        "hg38.ml.fa.gz": "https://storage.googleapis.com/basenji_barnyard2/hg38.ml.fa.gz",
        "sequences_human.bed": "https://storage.googleapis.com/basenji_barnyard2/sequences_human.bed",
    },
}
CHUNK = 1 << 20
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class DownloadError(RuntimeError):
    """A download that cannot complete; the message names the URL and what to do."""


def _request(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "caduceus-dist"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _fetch_once(url: str, part: Path, timeout: float, progress: Callable[[int, int], None] | None) -> int:
    """Append the missing bytes of `url` to `part`; return the total size the server reported."""
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _request(url, offset, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: complete, or longer than the file
            total = exc.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == offset:
                return offset
            part.unlink()
            raise ConnectionError(f"{part} does not fit the file on the server; starting over") from None
        raise
    with response:
        if response.status == 206:
            match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != offset:
                raise DownloadError(f"{url}: server answered Range {offset}- with {response.headers.get('Content-Range')}")
            total = int(match.group(3)) if match.group(3) != "*" else -1
            mode = "ab"
        else:  # 200: the server ignores Range; start over
            total = int(response.headers.get("Content-Length", -1))
            offset, mode = 0, "wb"
        with open(part, mode) as fh:
            while block := response.read(CHUNK):
                fh.write(block)
                offset += len(block)
                if progress:
                    progress(offset, total)
    if total >= 0 and offset != total:
        raise ConnectionError(f"connection closed after {offset} of {total} bytes")
    return offset


def download_file(url: str, dest: Path, retries: int = 5, timeout: float = 60.0,
                  progress: Callable[[int, int], None] | None = None, backoff: float = 1.0) -> Path:
    """Download `url` to `dest` (skipped if `dest` exists), resuming from `dest.part` across attempts."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, progress)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL or --mirror") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, OSError) as exc:
            last_error = exc
            if attempt < retries:
                time.sleep(backoff * (attempt + 1))
    received = part.stat().st_size if part.exists() else 0
    kept = f"{part} keeps the bytes received so far; rerun to resume ({received:,} bytes). " if received else ""
    raise DownloadError(
        f"{url}: download failed after {retries + 1} attempts ({last_error}). {kept}Without network, download "
        f"the file elsewhere, place it at {dest}, and run the sharder with --fasta/--bed"
    )


def download_assembly(name: str, data_dir: Path, mirror: str | None = None, **kwargs) -> dict[str, Path]:
    """Fetch every file of `name` into `data_dir`; `mirror` replaces the URL's directory (same file names)."""
    if name not in DOWNLOADS:
        raise DownloadError(f"--download {name!r} is unknown; available: {', '.join(DOWNLOADS)}")
    paths = {}
    for filename, url in DOWNLOADS[name].items():
        if mirror:
            url = f"{mirror.rstrip('/')}/{filename}"
        paths[filename] = download_file(url, data_dir / filename, **kwargs)
    return paths
