"""Sharding throughput: end-to-end bases/s on a whole chromosome vs this machine's limit, measured in the same run.

    python benchmarks/bench_shard.py                       # GRCh37 chr20 (63 Mbp, BGZF) from ../shared/data

The limit is what any sharder must at least do per base: decompress the input once and pack the same
number of bases into the shard encoding (2-bit bases and run lists per window, `shard_format.encode_bases`),
single-threaded. Ours adds parsing, token
lookup, N counting, tar/index writing, sha256 and fsync.

The second worker is judged against the limit's own gain from a second thread, measured in the same run
(two copies of the limit's work at once, in two threads): 2.0 on two idle cores, less when other jobs hold
a core, and no sharder can gain more than that. The CPU accounting (total, main thread, worker threads)
also gives the time on idle cores, which the load barely affects, and with threads the worker tasks'
wall time is split into CPU, waiting for a CPU and waiting for the GIL (what would stop threads from
scaling). Every figure is the best of --repeats runs; the load average is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from caduceus_dist.prep import fasta, sharding  # noqa: E402
from caduceus_dist.prep.fasta import TRANSLATION, gunzip_chunks  # noqa: E402
from caduceus_dist.prep.sharding import ShardConfig, shard_genome  # noqa: E402
from caduceus_dist.shard_format import encode_bases  # noqa: E402

HG38_BASES = 3_100_000_000
CHUNK = 1 << 22
SHARED = Path(os.environ.get("CADUCEUS_SHARED_DATA", REPO.parent / "shared" / "data"))


def raw_decompress(path: Path) -> bytes:
    """Raw zlib over all gzip/BGZF members (zlib releases the GIL, so copies can run in parallel threads)."""
    with open(path, "rb") as fh:
        return b"".join(gunzip_chunks(fh, CHUNK))


def decompress_seconds(path: Path) -> tuple[float, float, bytes]:
    """Plain streaming decompression of the whole file: the faster of Python's gzip module and raw zlib
    (the most favourable baseline). Returns wall and CPU seconds and the text."""
    timings = []
    wall, cpu = time.perf_counter(), time.thread_time()
    with gzip.open(path, "rb") as fh:
        while fh.read(CHUNK):
            pass
    timings.append((time.perf_counter() - wall, time.thread_time() - cpu))
    wall, cpu = time.perf_counter(), time.thread_time()
    text = raw_decompress(path)
    timings.append((time.perf_counter() - wall, time.thread_time() - cpu))
    return *min(timings), text


def pack_seconds(payload: bytes, window: int) -> tuple[float, float]:
    tokens = np.frombuffer(payload, dtype=np.uint8)
    tokens = tokens[:len(tokens) // window * window].reshape(-1, window)
    wall, cpu = time.perf_counter(), time.thread_time()
    for first in range(0, len(tokens), 32):  # runs of 32 windows (4 Mbp), as the sharder's workers pack them
        encode_bases(tokens[first:first + 32])
    return time.perf_counter() - wall, time.thread_time() - cpu


def limit_copies_seconds(path: Path, payload: bytes, window: int, copies: int) -> float:
    """Wall seconds for `copies` threads each doing the limit's whole work (raw decompress + packing) at once."""
    def work(_) -> None:
        raw_decompress(path)
        pack_seconds(payload, window)

    with ThreadPoolExecutor(copies) as pool:
        start = time.perf_counter()
        list(pool.map(work, range(copies)))
        return time.perf_counter() - start


def thread_schedstat() -> tuple[float, float]:
    """(CPU seconds, seconds spent runnable but waiting for a CPU) of the calling thread (Linux; else zeros)."""
    try:
        with open("/proc/thread-self/schedstat") as fh:
            cpu, waiting = fh.read().split()[:2]
    except OSError:
        return 0.0, 0.0
    return int(cpu) / 1e9, int(waiting) / 1e9


@dataclass
class TaskClock:
    """Wall time of the sharder's worker-thread tasks (BGZF inflate, run packing), split into CPU, waiting for
    a CPU (other jobs, more threads than cores) and the rest, which is waiting for the GIL: the tasks do no I/O."""

    TASKS = ((fasta, "inflate_bgzf"), (sharding, "pack_run"))
    wall: float = 0.0
    cpu: float = 0.0
    waiting_for_cpu: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def waiting_for_gil(self) -> float:
        return self.wall - self.cpu - self.waiting_for_cpu

    @contextlib.contextmanager
    def timing(self):
        originals = [getattr(module, name) for module, name in self.TASKS]
        for (module, name), task in zip(self.TASKS, originals, strict=True):
            setattr(module, name, self._timed(task))
        try:
            yield self
        finally:
            for (module, name), task in zip(self.TASKS, originals, strict=True):
                setattr(module, name, task)

    def _timed(self, task):
        def timed(*args):
            start, (cpu, waiting) = time.perf_counter(), thread_schedstat()
            result = task(*args)
            end, (cpu_end, waiting_end) = time.perf_counter(), thread_schedstat()
            with self.lock:  # two worker threads add at once
                self.wall, self.cpu = self.wall + end - start, self.cpu + cpu_end - cpu
                self.waiting_for_cpu += waiting_end - waiting
            return result
        return timed


def cpu_seconds() -> float:
    """CPU time (user + system) of this process (every thread, ended ones too) and of its ended children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Run:
    wall: float
    cpu: float  # every thread and process
    main_cpu: float
    tasks: TaskClock | None  # worker-thread tasks (None: processes, or no pool with one worker)


def shard_once(path: Path, workers: int, kind: str, window: int, scratch: Path) -> tuple[Run, int]:
    out = scratch / f"w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    tasks = TaskClock() if kind == "threads" and workers > 1 else None
    with tasks.timing() if tasks else contextlib.nullcontext():
        cpu_before, main_before = cpu_seconds(), time.thread_time()
        start = time.perf_counter()
        manifest = shard_genome(ShardConfig(fasta=str(path), out=str(out), window=window, workers=workers,
                                            worker_kind=kind, quiet=True))
        run = Run(time.perf_counter() - start, cpu_seconds() - cpu_before, time.thread_time() - main_before, tasks)
    shutil.rmtree(out)
    return run, manifest["fasta"]["bases"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fasta", type=Path, default=SHARED / "grch37_chr20.fa.gz")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=131072)
    parser.add_argument("--worker-kind", choices=["threads", "processes"], default="threads")
    args = parser.parse_args()
    if not args.fasta.exists():
        sys.exit(f"{args.fasta} not found: pass --fasta or set CADUCEUS_SHARED_DATA")

    load_before = os.getloadavg()
    decompress, packing, one_copy, two_copies = [], [], [], []
    ours: dict[int, list[Run]] = {w: [] for w in args.workers}
    bases = 0
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as scratch:
        for _ in range(args.repeats):
            wall, cpu, text = decompress_seconds(args.fasta)
            decompress.append((wall, cpu))
            sequence = text.split(b"\n", 1)[1].translate(TRANSLATION, b"\n")
            del text
            packing.append(pack_seconds(sequence, args.window))
            one_copy.append(limit_copies_seconds(args.fasta, sequence, args.window, 1))
            two_copies.append(limit_copies_seconds(args.fasta, sequence, args.window, 2))
            del sequence
            for workers in args.workers:
                run, bases = shard_once(args.fasta, workers, args.worker_kind, args.window, Path(scratch))
                ours[workers].append(run)
    load_after = os.getloadavg()

    limit_wall = min(w for w, _ in decompress) + min(w for w, _ in packing)
    limit_cpu = min(c for _, c in decompress) + min(c for _, c in packing)
    limit_gain = 2 * min(one_copy) / min(two_copies)
    print(f"input: {args.fasta} ({bases / 1e6:.1f} Mbp), window {args.window}, "
          f"{args.worker_kind}, best of {args.repeats}")
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before / {load_after[0]:.1f} after "
          "(shared with other jobs: wall times are lower bounds; CPU times are much less affected by the load)")
    print(f"limit  decompress + pack, one thread: wall {limit_wall:.2f} s -> {bases / limit_wall / 1e6:.1f} Mbp/s; "
          f"CPU {limit_cpu:.2f} s; two copies at once in two threads: {limit_gain:.2f}x the work per second "
          "of one (2.00 on two idle cores)")
    first = None
    for workers, runs in ours.items():
        best = min(runs, key=lambda r: r.wall)
        cpu, main_cpu = min(r.cpu for r in runs), min(r.main_cpu for r in runs)
        idle = max(main_cpu, cpu / min(workers, os.cpu_count() or 1))
        first = first or (best.wall, idle)
        print(f"ours   workers={workers}: wall {best.wall:.2f} s (median {sorted(r.wall for r in runs)[len(runs) // 2]:.2f}) "
              f"-> {bases / best.wall / 1e6:.1f} Mbp/s = {limit_wall / best.wall:.2f} x limit, "
              f"{first[0] / best.wall:.2f} x workers=1; hg38 (3.1 Gbp) in {HG38_BASES / bases * best.wall / 60:.1f} min")
        print(f"       CPU {cpu:.2f} s in all (limit/ours = {limit_cpu / cpu:.2f}): main thread {main_cpu:.2f} s, "
              f"workers {cpu - main_cpu:.2f} s; on {workers} idle core(s) >= {idle:.2f} s -> {bases / idle / 1e6:.1f} "
              f"Mbp/s, {limit_cpu / idle:.2f} x limit, {first[1] / idle:.2f} x workers=1, "
              f"hg38 in {HG38_BASES / bases * idle / 60:.1f} min (from CPU time)")
        if best.tasks:
            t = best.tasks
            print(f"       worker tasks (fastest run): wall {t.wall:.2f} s = CPU {t.cpu:.2f} + waiting for a CPU "
                  f"{t.waiting_for_cpu:.2f} + waiting for the GIL {t.waiting_for_gil:.2f}")
    one = ours[args.workers[0]]
    print(f"RATIO ours(workers={args.workers[0]}) / limit = {limit_wall / min(r.wall for r in one):.2f} (wall), "
          f"{limit_cpu / min(r.cpu for r in one):.2f} (CPU)")
    if len(args.workers) > 1:
        last = args.workers[-1]
        gain = min(r.wall for r in one) / min(r.wall for r in ours[last])
        print(f"GAIN workers={last} / workers={args.workers[0]} = {gain:.2f} (wall); the limit's own gain from a "
              f"second thread in this run: {limit_gain:.2f}, so ours reaches {gain / limit_gain:.2f} of it")


if __name__ == "__main__":
    main()
