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


def decompress_seconds(path: Path) -> tuple[float, float, bytes]:
    """Plain streaming decompression of the whole file: the faster of Python's gzip module and raw zlib
    over all gzip/BGZF members (the most favourable baseline). Returns wall and CPU seconds and the text."""
    timings = []
    wall, cpu = time.perf_counter(), time.thread_time()
    with gzip.open(path, "rb") as fh:
        while fh.read(CHUNK):
            pass
    timings.append((time.perf_counter() - wall, time.thread_time() - cpu))
    wall, cpu = time.perf_counter(), time.thread_time()
    with open(path, "rb") as fh:
        parts = list(gunzip_chunks(fh, CHUNK))
    timings.append((time.perf_counter() - wall, time.thread_time() - cpu))
    return *min(timings), b"".join(parts)


def zstd_seconds(payload: bytes, window: int, level: int) -> tuple[float, float]:
    compressor = zstandard.ZstdCompressor(level=level)
    view = memoryview(payload)
    wall, cpu = time.perf_counter(), time.thread_time()
    for offset in range(0, len(view) - window + 1, window):
        compressor.compress(view[offset:offset + window])
    return time.perf_counter() - wall, time.thread_time() - cpu


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def shard_seconds(fasta: Path, workers: int, kind: str, window: int, level: int,
                  scratch: Path) -> tuple[float, float, float, int]:
    """Wall seconds, CPU seconds of the main thread, CPU seconds of everything (threads, processes), bases."""
    out = scratch / f"w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cpu_before, main_before = cpu_seconds(), time.thread_time()
    start = time.perf_counter()
    manifest = shard_genome(ShardConfig(fasta=str(fasta), out=str(out), window=window, zstd_level=level,
                                        workers=workers, worker_kind=kind, quiet=True))
    seconds = time.perf_counter() - start
    cpu_after, main_thread = cpu_seconds(), time.thread_time() - main_before
    shutil.rmtree(out)
    total = cpu_after[0] - cpu_before[0] + cpu_after[1] - cpu_before[1]
    return seconds, main_thread, total, manifest["fasta"]["bases"]


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
    decompress, zstd = [], []
    ours: dict[int, list[tuple[float, float, float]]] = {w: [] for w in args.workers}
    bases = 0
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as scratch:
        for _ in range(args.repeats):
            wall, cpu, text = decompress_seconds(args.fasta)
            decompress.append((wall, cpu))
            sequence = text.split(b"\n", 1)[1].translate(TRANSLATION, b"\n")
            del text
            zstd.append(zstd_seconds(sequence, args.window, args.zstd_level))
            del sequence
            for workers in args.workers:
                wall, main_cpu, total_cpu, bases = shard_seconds(
                    args.fasta, workers, args.worker_kind, args.window, args.zstd_level, Path(scratch))
                ours[workers].append((wall, total_cpu, main_cpu))
    load_after = os.getloadavg()

    limit_wall = min(w for w, _ in decompress) + min(w for w, _ in zstd)
    limit_cpu = min(c for _, c in decompress) + min(c for _, c in zstd)
    print(f"input: {args.fasta} ({bases / 1e6:.1f} Mbp), window {args.window}, zstd level {args.zstd_level}, "
          f"{args.worker_kind}, best of {args.repeats}")
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
          "(shared with other jobs: wall times are lower bounds; CPU times are much less affected by the load)")
    print(f"limit  decompress + zstd, one thread: wall {limit_wall:.2f} s -> {bases / limit_wall / 1e6:.1f} Mbp/s; "
          f"CPU {limit_cpu:.2f} s")
    first_wall = None
    for workers, runs in ours.items():
        wall = min(r[0] for r in runs)
        total_cpu, main_cpu = min(r[1] for r in runs), min(r[2] for r in runs)
        first_wall = first_wall or wall
        idle = max(main_cpu, total_cpu / min(workers, os.cpu_count() or 1))
        print(f"ours   workers={workers}: wall {wall:.2f} s (median {sorted(r[0] for r in runs)[len(runs) // 2]:.2f}) "
              f"-> {bases / wall / 1e6:.1f} Mbp/s = {limit_wall / wall:.2f} x limit, {first_wall / wall:.2f} x workers=1"
              f"; hg38 (3.1 Gbp) in {HG38_BASES / bases * wall / 60:.1f} min")
        print(f"       CPU {total_cpu:.2f} s in all (limit/ours = {limit_cpu / total_cpu:.2f}), {main_cpu:.2f} s on the "
              f"main thread; on {workers} idle core(s) >= {idle:.2f} s -> {bases / idle / 1e6:.1f} Mbp/s, "
              f"{limit_cpu / idle:.2f} x limit, hg38 in {HG38_BASES / bases * idle / 60:.1f} min (from CPU time)")
    one = min(r[0] for r in ours[args.workers[0]])
    print(f"RATIO ours(workers={args.workers[0]}) / limit = {limit_wall / one:.2f} (wall), "
          f"{limit_cpu / min(r[1] for r in ours[args.workers[0]]):.2f} (CPU)")


if __name__ == "__main__":
    main()
