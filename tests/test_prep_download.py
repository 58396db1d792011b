"""`--download`: resumable HTTP Range downloads against a real local HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import http.server
import re
import threading
from pathlib import Path

import pytest

from caduceus_dist.prep.cli import main as cli_main
from caduceus_dist.prep.download import DownloadError, download_file
from caduceus_dist.prep.verify import verify_dataset

SAMPLE = Path(__file__).resolve().parents[1] / "caduceus_dist" / "sample"
RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves `files` with HTTP Range support; the first `drops` responses are cut after `drop_after` bytes."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes], drops: int = 0, drop_after: int = 0, honour_range: bool = True):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files, self.drops, self.drop_after, self.honour_range = files, drops, drop_after, honour_range
        self.requests: list[tuple[str, str | None]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    server: RangeServer

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        range_header = self.headers.get("Range")
        srv.requests.append((self.path, range_header))
        data = srv.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start, end = 0, len(data)
        match = RANGE.match(range_header or "") if srv.honour_range else None
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) + 1 if match.group(2) else len(data)
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        body = data[start:end]
        if srv.drops > 0:
            srv.drops -= 1
            body = body[: srv.drop_after]  # the connection dies mid-body
            self.close_connection = True
        self.wfile.write(body)


@pytest.fixture
def serve():
    servers = []

    def start(files: dict[str, bytes], **kwargs) -> RangeServer:
        server = RangeServer(files, **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def payload() -> bytes:
    return gzip.decompress((SAMPLE / "hg38_sample.fa.gz").read_bytes())  # 220 kB of real sequence text


def test_dropped_connections_resume_with_range_requests(serve, tmp_path):
    data = payload()
    server = serve({"genome.fa": data}, drops=2, drop_after=50_000)
    dest = download_file(f"{server.url}/genome.fa", tmp_path / "genome.fa", backoff=0)
    assert dest.read_bytes() == data and not (tmp_path / "genome.fa.part").exists()
    assert [r for _, r in server.requests] == [None, "bytes=50000-", "bytes=100000-"]


def test_existing_part_file_is_continued(serve, tmp_path):
    data = payload()
    (tmp_path / "genome.fa.part").write_bytes(data[:123_456])
    server = serve({"genome.fa": data})
    download_file(f"{server.url}/genome.fa", tmp_path / "genome.fa", backoff=0)
    assert (tmp_path / "genome.fa").read_bytes() == data
    assert [r for _, r in server.requests] == ["bytes=123456-"]
    download_file(f"{server.url}/genome.fa", tmp_path / "genome.fa", backoff=0)
    assert len(server.requests) == 1  # a finished file is not fetched again


def test_complete_part_file_and_server_without_range_support(serve, tmp_path):
    data = payload()
    (tmp_path / "a.fa.part").write_bytes(data)
    server = serve({"a.fa": data, "b.fa": data}, honour_range=False)
    download_file(f"{server.url}/a.fa", tmp_path / "a.fa", backoff=0)  # server ignores Range: starts over
    assert (tmp_path / "a.fa").read_bytes() == data
    ranged = serve({"c.fa": data})
    (tmp_path / "c.fa.part").write_bytes(data)
    download_file(f"{ranged.url}/c.fa", tmp_path / "c.fa", backoff=0)  # 416: nothing left, already complete
    assert (tmp_path / "c.fa").read_bytes() == data and ranged.requests == [("/c.fa", f"bytes={len(data)}-")]


def test_failures_are_clear_and_keep_the_partial_bytes(serve, tmp_path):
    data = payload()
    server = serve({"genome.fa": data}, drops=100, drop_after=10_000)
    with pytest.raises(DownloadError, match=r"download failed after 3 attempts .* keeps the bytes received so far; "
                                            r"rerun to resume"):
        download_file(f"{server.url}/genome.fa", tmp_path / "genome.fa", retries=2, backoff=0)
    assert (tmp_path / "genome.fa.part").read_bytes() == data[:30_000]
    with pytest.raises(DownloadError, match=r"missing.fa: HTTP 404"):
        download_file(f"{server.url}/missing.fa", tmp_path / "missing.fa", backoff=0)


def test_cli_download_hg38_from_a_mirror_then_shard(serve, tmp_path, capsys):
    """The hg38 file names of docs/reference-recipe.md §1, served locally (with the sample's content), then sharded."""
    bed = "".join(f"chr22:16600000-16800000\t{s}\t{s + 32768}\t{sp}\n"
                  for s, sp in [(0, "train"), (32768, "train"), (65536, "valid"), (98304, "test")])
    server = serve({"hg38.ml.fa.gz": (SAMPLE / "hg38_sample.fa.gz").read_bytes(), "sequences_human.bed": bed.encode()},
                   drops=1, drop_after=20_000)
    assert cli_main(["--download", "hg38", "--mirror", server.url, "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    fasta, bed_path = tmp_path / "hg38" / "hg38.ml.fa.gz", tmp_path / "hg38" / "sequences_human.bed"
    assert f"--fasta {fasta} --bed {bed_path}" in out
    assert fasta.read_bytes() == (SAMPLE / "hg38_sample.fa.gz").read_bytes()
    shards = tmp_path / "shards"
    assert cli_main(["--fasta", str(fasta), "--bed", str(bed_path), "--out", str(shards), "--window", "4096",
                     "--tiling", "tile", "--quiet"]) == 0
    assert verify_dataset(shards).ok
