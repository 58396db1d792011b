"""Sharding throughput: end-to-end bases/s on a whole chromosome vs this machine's limit, measured in the same run.

    python benchmarks/bench_shard.py                       # GRCh37 chr20 (63 Mbp, BGZF) from ../shared/data

The limit is what any sharder must at least do per base: decompress the input once and zstd-compress the
same number of bytes (window-sized frames, the same level), single-threaded. Ours adds parsing, token
lookup, N counting, tar/index writing, sha256 and fsync. Every figure is the best of --repeats runs, so
load from other processes on a shared machine hurts it least; the load average is printed.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from caduceus_dist.data.fasta import TRANSLATION, gunzip_chunks  # noqa: E402
from caduceus_dist.data.sharding import ShardConfig, shard_genome  # noqa: E402

HG38_BASES = 3_100_000_000
CHUNK = 1 << 22
SHARED = Path(os.environ.get("CADUCEUS_SHARED_DATA", REPO.parent / "shared" / "data"))


def decompress_seconds(path: Path) -> tuple[float, bytes]:
    """Plain streaming decompression of the whole file: the faster of Python's gzip module and raw zlib
    over all gzip/BGZF members (the most favourable baseline). Returns the time and the text."""
    start = time.perf_counter()
    with gzip.open(path, "rb") as fh:
        while fh.read(CHUNK):
            pass
    gzip_module = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as fh:
        parts = list(gunzip_chunks(fh, CHUNK))
    return min(gzip_module, time.perf_counter() - start), b"".join(parts)


def zstd_seconds(payload: bytes, window: int, level: int) -> float:
    compressor = zstandard.ZstdCompressor(level=level)
    view = memoryview(payload)
    start = time.perf_counter()
    for offset in range(0, len(view) - window + 1, window):
        compressor.compress(view[offset:offset + window])
    return time.perf_counter() - start


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def shard_seconds(fasta: Path, workers: int, kind: str, window: int, level: int,
                  scratch: Path) -> tuple[float, float, float, int]:
    """Wall seconds, main-process CPU seconds, worker CPU seconds, bases."""
    out = scratch / f"w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    manifest = shard_genome(ShardConfig(fasta=str(fasta), out=str(out), window=window, zstd_level=level,
                                        workers=workers, worker_kind=kind, quiet=True))
    seconds = time.perf_counter() - start
    cpu_after = cpu_seconds()
    shutil.rmtree(out)
    return seconds, cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1], manifest["fasta"]["bases"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fasta", type=Path, default=SHARED / "grch37_chr20.fa.gz")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=131072)
    parser.add_argument("--zstd-level", type=int, default=3)
    parser.add_argument("--worker-kind", choices=["threads", "processes"], default="threads")
    args = parser.parse_args()
    if not args.fasta.exists():
        sys.exit(f"{args.fasta} not found: pass --fasta or set CADUCEUS_SHARED_DATA")

    load_before = os.getloadavg()
    decompress, zstd, ours = [], [], {w: [] for w in args.workers}
    cpu = {w: [] for w in args.workers}
    bases = 0
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as scratch:
        for _ in range(args.repeats):
            seconds, text = decompress_seconds(args.fasta)
            decompress.append(seconds)
            sequence = text.split(b"\n", 1)[1].translate(TRANSLATION, b"\n")
            del text
            zstd.append(zstd_seconds(sequence, args.window, args.zstd_level))
            del sequence
            for workers in args.workers:
                seconds, main_cpu, worker_cpu, bases = shard_seconds(
                    args.fasta, workers, args.worker_kind, args.window, args.zstd_level, Path(scratch))
                ours[workers].append(seconds)
                cpu[workers].append((main_cpu, worker_cpu))
    load_after = os.getloadavg()

    limit_s = min(decompress) + min(zstd)
    limit_rate = bases / limit_s
    print(f"input: {args.fasta} ({bases / 1e6:.1f} Mbp), window {args.window}, zstd level {args.zstd_level}, "
          f"{args.worker_kind}, best of {args.repeats}")
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
          f"(other jobs share this machine: figures are lower bounds)")
    print(f"limit  decompress {min(decompress):.2f} s + zstd {min(zstd):.2f} s = {limit_s:.2f} s "
          f"-> {limit_rate / 1e6:.1f} Mbp/s (single thread)")
    base_rate = None
    for workers, times in ours.items():
        rate = bases / min(times)
        base_rate = base_rate or rate
        main_cpu, worker_cpu = min(cpu[workers])
        print(f"ours   workers={workers}: {min(times):.2f} s (median {sorted(times)[len(times) // 2]:.2f}) "
              f"-> {rate / 1e6:.1f} Mbp/s = {rate / limit_rate:.2f} x limit, {rate / base_rate:.2f} x workers=1; "
              f"hg38 (3.1 Gbp) in {HG38_BASES / rate / 60:.1f} min")
        print(f"       CPU: {main_cpu:.2f} s in this process (threads included) + {worker_cpu:.2f} s in worker processes")
    print(f"RATIO ours(workers={args.workers[0]}) / limit = {bases / min(ours[args.workers[0]]) / limit_rate:.2f}")


if __name__ == "__main__":
    main()
