"""FASTA + splits -> WebDataset shards: planning, parallel packing, resumable output, manifest.

Why it is shaped this way:
- Determinism. The main thread streams the FASTA, decides every window, its split and its sample id
  (FASTA record order, then interval order, then position), and appends every shard's bytes in id order.
  Workers turn a run of consecutive samples into finished tar members (2-bit bases, runs, JSON, headers) in one task,
  so the bytes on disk cannot depend on `--workers`, and a big record (chr1, chr20) is spread over all
  workers by window ranges.
- Scaling with threads. Everything per window that holds the GIL is either vectorised (N counts) or in
  the workers' one-task-per-run packing; a run's bases are packed by whole-run numpy operations (which
  release the GIL), so the main thread and the workers seldom wait for each other (see benchmarks/bench_shard.py for the accounting).
- Crash safety (`output.py`). Finished shards are journaled with their sha256; a rerun with the
  same arguments keeps those that still match, skips their windows and writes the rest; the manifest is
  written last, atomically.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from caduceus_dist import __version__
from caduceus_dist.fsio import file_digest
from caduceus_dist.model.tokenizer import N_ID
from caduceus_dist.prep.fasta import FastaReader, FastaRecord
from caduceus_dist.prep.output import OutputDir, ShardingError, ShardSink, pack_members
from caduceus_dist.prep.splits import CONTIG_END, make_split_plan
from caduceus_dist.prep.tiling import resolve_tiling
from caduceus_dist.prep.workers import ordered_map, worker_pool
from caduceus_dist.shard_format import (
    BASES_SUFFIX,
    FORMAT_NAME,
    FORMAT_VERSION,
    JSON_SUFFIX,
    MANIFEST_NAME,
    RUNS_SUFFIX,
    encode_bases,
    sample_key,
    softmasked,
    token_ids,
)

BATCH_BASES = 1 << 22  # bases per worker task (a run of samples): small enough to spread one chromosome
TARGET_SHARD_BASES = 1 << 27  # default shard size: 1024 windows of 131072 (~37 MB of compressed tokens)
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "sample"


@dataclass
class ShardConfig:
    """Everything that decides the output, plus how to run (workers, quiet, overwrite)."""

    fasta: str
    out: str
    bed: str | None = None
    split_map: str | None = None
    valid_chroms: list[str] = field(default_factory=list)
    test_chroms: list[str] = field(default_factory=list)
    contigs: str = "primary"
    valid_fraction: float = 0.0  # whole contigs: windows held out at random as valid (seeded by split_seed)
    test_fraction: float = 0.0
    split_seed: int = 0
    holdout: str = "windows"  # what a fraction holds out: windows, or whole contigs
    window: int = 131072
    tiling: str | None = None  # reference with a BED, tile without
    samples_per_shard: int | None = None  # default: TARGET_SHARD_BASES // window
    max_n_fraction: float | None = None  # drop windows with more N than this fraction; None: only all-N ones
    assembly: str | None = None  # default: the FASTA file name without .fa/.fasta/.gz
    strict: bool = False
    workers: int = 1
    worker_kind: str = "threads"  # see workers.WORKER_KINDS
    overwrite: bool = False
    quiet: bool = False

    RUN_ONLY = ("workers", "worker_kind", "overwrite", "quiet")  # do not change the bytes written
    HOLDOUT = ("valid_fraction", "test_fraction", "split_seed", "holdout")  # recorded only when a fraction is held out

    def resolved_samples_per_shard(self) -> int:
        return self.samples_per_shard or max(1, TARGET_SHARD_BASES // self.window)

    def resolved_assembly(self) -> str:
        if self.assembly:
            return self.assembly
        name = Path(self.fasta).name
        for suffix in (".gz", ".bgz", ".fa", ".fasta", ".fna"):
            name = name.removesuffix(suffix)
        return name


def max_n_bases(window: int, max_n_fraction: float | None) -> int:
    """The most N bases a stored window may hold (all-N windows are never stored)."""
    return window - 1 if max_n_fraction is None else min(window - 1, int(max_n_fraction * window))


def sample_config(**overrides) -> ShardConfig:
    """The no-argument run: the embedded real-hg38 sample, 8192-base windows, small shards."""
    values = dict(
        fasta=str(SAMPLE_DIR / "hg38_sample.fa.gz"), bed=str(SAMPLE_DIR / "hg38_sample_splits.bed"),
        out="data/shards/sample", window=8192, tiling="tile", samples_per_shard=8, assembly="hg38",
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ShardConfig(**values)


def ensure_sample_shards(shards: str) -> None:
    """The quickstart convenience: the default sample location is sharded on first use (rank 0 only)."""
    target, default = Path(shards), Path(sample_config().out)
    if target.resolve() == default.resolve() and not (target / MANIFEST_NAME).exists():
        print(f"sharding the embedded sample genome into {target} (first run only)", flush=True)
        shard_genome(sample_config(out=str(target)))


# ---------------------------------------------------------------------------------------------- workers

def pack_run(tokens: bytearray, window: int, split: str, first_id: int, common: dict,
             coords: list[tuple[str, int, int, int]]) -> tuple[bytes, np.ndarray]:
    """Worker task: samples `first_id`.. of `split` (`coords`: chrom, start, end, N count; `tokens`: their
    windows back to back) as tar members, the blob and index places that `ShardSink.add` appends."""
    encoded = encode_bases(np.frombuffer(tokens, dtype=np.uint8).reshape(len(coords), window))
    members = []
    for k, ((chrom, start, end, n_count), (bases, runs)) in enumerate(zip(coords, encoded, strict=True)):
        key = sample_key(split, first_id + k)
        meta = {**common, "id": first_id + k, "chrom": chrom, "start": start, "end": end,
                "n_fraction": n_count / window}
        members += [(key + JSON_SUFFIX, json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
                    (key + BASES_SUFFIX, bases), (key + RUNS_SUFFIX, runs)]
    return pack_members(members)


# ---------------------------------------------------------------------------------------------- planning

@dataclass
class SplitTotals:
    windows: int = 0
    bases: int = 0
    n_bases: int = 0
    softmasked_bases: int = 0  # stored bases that were lower case in the FASTA (flagged, shard format v2)
    dropped_windows: int = 0  # all-N windows (or over --max-n-fraction), not stored

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SampleRun:
    """Consecutive samples of one shard: cut by the main thread, packed by one worker task."""

    split: str
    first_id: int
    window: int
    common: dict  # metadata every sample of the run shares
    coords: list[tuple[str, int, int, int]] = field(default_factory=list)  # chrom, start, end, N count
    tokens: bytearray = field(default_factory=bytearray)

    @property
    def args(self) -> tuple:
        return self.tokens, self.window, self.split, self.first_id, self.common, self.coords


@dataclass
class RunStats:
    totals: dict[str, SplitTotals] = field(default_factory=dict)
    records: int = 0
    fasta_bases: int = 0
    iupac_to_n: int = 0
    bed_bases: int = 0  # bases inside the BED intervals of the contigs the FASTA has
    bed_bases_stored: int = 0  # of those, the bases inside a stored window


class WindowCursor:
    """Walks one record's windows in output order (interval by interval) as its bases arrive.

    While the record streams, a window is handed out once it ends within the bases read so far (final in
    every tiling mode); when the record is complete, the rest come from the tiling with the true length.
    """

    def __init__(self, intervals: list, tile, window: int):
        self.intervals, self.tile, self.window = intervals, tile, window
        self.index = 0  # current interval
        self.done_in_interval = 0  # windows of it already handed out
        self._windows: Iterator | None = None
        self._next: tuple[int, int] | None = None
        self._final = False

    def advance(self, available: int, length: int | None) -> Iterator[tuple[object, int, int]]:
        if length is not None and not self._final:  # the record just completed: switch to true windows
            self._final, self._windows, self._next = True, None, None
        while self.index < len(self.intervals):
            interval = self.intervals[self.index]
            if self._windows is None:
                self._windows = islice(self.tile(interval, length, self.window),
                                       self.done_in_interval if self._final else 0, None)
            if self._next is None:
                self._next = next(self._windows, None)
                if self._next is None:
                    self.index, self.done_in_interval, self._windows = self.index + 1, 0, None
                    continue
            start, end = self._next
            if not self._final and end > available:
                return
            self._next = None
            self.done_in_interval += 1
            yield interval, start, end


class RunCutter:
    """Cuts a record's windows into `SampleRun`s: N counts, drops, sample ids, finished shards skipped."""

    def __init__(self, cfg: ShardConfig, fasta_sha: str, finished: set[tuple[str, int]], stats: RunStats, plan):
        self.window, self.per_shard = cfg.window, cfg.resolved_samples_per_shard()
        self.max_n = max_n_bases(cfg.window, cfg.max_n_fraction)
        self.common = {"assembly": cfg.resolved_assembly(), "fasta_sha256": fasta_sha, "length": cfg.window,
                       "strand": "+"}
        self.finished, self.stats, self.plan = finished, stats, plan
        self.open: dict[str, SampleRun] = {}  # the run being filled, per split

    def cut(self, record: FastaRecord, windows: list[tuple[object, int, int]]) -> list[SampleRun]:
        """Add `windows` (interval, start, end) of `record`; return the runs that became full, in id order."""
        full, bases = [], record.bases
        for interval, start, end in windows:
            stored = bases[start:end]
            n_count = int(np.count_nonzero(token_ids(stored) == N_ID))
            split = self.plan.window_split(interval, start)
            totals = self.stats.totals.setdefault(split, SplitTotals())
            if n_count > self.max_n:
                totals.dropped_windows += 1
                continue
            sample_id = totals.windows
            if interval.end != CONTIG_END:  # a window's share of its BED interval (windows of one never overlap)
                self.stats.bed_bases_stored += max(0, min(end, interval.end) - max(start, interval.start))
            totals.windows += 1
            totals.bases += self.window
            totals.n_bases += n_count
            totals.softmasked_bases += int(np.count_nonzero(softmasked(stored)))
            if (split, sample_id // self.per_shard) in self.finished:
                continue
            run = self.open.get(split)
            if run is None:
                run = self.open[split] = SampleRun(split, sample_id, self.window,
                                                   {**self.common, "split": split})
            run.coords.append((record.name, start, end, n_count))
            run.tokens.extend(bases[start:end])  # one memcpy (buffer protocol)
            if (sample_id + 1) % self.per_shard == 0 or len(run.coords) * self.window >= BATCH_BASES:
                full.append(self.open.pop(split))  # a run never spans two shards
        return full

    def flush(self) -> list[SampleRun]:
        """Every run still open (at the end of a record, so its shards can complete before the next is read)."""
        runs, self.open = list(self.open.values()), {}
        return runs


def plan_runs(cfg: ShardConfig, reader: FastaReader, plan, tile, fasta_sha: str,
              finished: set[tuple[str, int]], stats: RunStats) -> Iterator[SampleRun]:
    """Stream the FASTA and yield runs of samples still to be written (finished shards are skipped)."""
    cutter = RunCutter(cfg, fasta_sha, finished, stats, plan)
    cursor, current = None, None
    for record in reader.stream():
        if record is not current:
            intervals = plan.intervals(record.name)
            stats.bed_bases += sum(i.end - i.start for i in intervals if i.end != CONTIG_END)
            current, cursor = record, WindowCursor(intervals, tile, cfg.window)
        length = len(record) if record.complete else None
        yield from cutter.cut(record, list(cursor.advance(len(record), length)))
        if record.complete:
            stats.records += 1
            stats.fasta_bases += len(record)
            stats.iupac_to_n += record.iupac_bases
            yield from cutter.flush()


# ---------------------------------------------------------------------------------------------- entry point

def identity_of(cfg: ShardConfig, fasta_sha: str, bed_sha: str | None, tiling: str) -> dict:
    holdout = cfg.valid_fraction or cfg.test_fraction
    args = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ShardConfig.RUN_ONLY and (holdout or k not in ShardConfig.HOLDOUT)}
    args.update(tiling=tiling, samples_per_shard=cfg.resolved_samples_per_shard(),
                assembly=cfg.resolved_assembly(), fasta_sha256=fasta_sha, bed_sha256=bed_sha)
    args.pop("out")
    return args


def shard_genome(cfg: ShardConfig, progress: Callable[[int, int, int], None] | None = None) -> dict:
    """Run the whole pipeline and return the manifest. `progress(bases_done, input_bytes_read, input_size)`."""
    if cfg.workers < 1:
        raise ShardingError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.samples_per_shard is not None and cfg.samples_per_shard < 1:
        raise ShardingError(f"--samples-per-shard must be >= 1, got {cfg.samples_per_shard}")
    if cfg.max_n_fraction is not None and not 0 <= cfg.max_n_fraction < 1:
        raise ShardingError(f"--max-n-fraction must be in [0, 1), got {cfg.max_n_fraction} "
                            "(leave it out to drop only all-N windows)")
    tiling, tile = resolve_tiling(cfg.tiling, cfg.window, cfg.bed is not None)
    plan = make_split_plan(cfg.bed, cfg.split_map, cfg.valid_chroms, cfg.test_chroms, cfg.contigs,
                           cfg.valid_fraction, cfg.test_fraction, cfg.split_seed, cfg.holdout)
    reader = FastaReader(cfg.fasta, strict=cfg.strict)
    fasta_digest = file_digest(cfg.fasta)
    fasta_sha, fasta_size = fasta_digest.sha256, fasta_digest.bytes
    bed_sha = file_digest(cfg.bed).sha256 if cfg.bed else None
    identity = identity_of(cfg, fasta_sha, bed_sha, tiling)
    out = OutputDir(Path(cfg.out), identity)
    if not cfg.overwrite and (finished := out.finished_manifest()) is not None:
        return finished  # nothing to do: same arguments, same input, every shard intact
    kept = out.prepare(cfg.overwrite)
    sink = ShardSink(out.root, cfg.resolved_samples_per_shard(), out.journal)
    stats = RunStats()
    bases_done = 0
    runs = plan_runs(cfg, reader, plan, tile, fasta_sha, set(kept), stats)
    try:
        with worker_pool(cfg.workers, cfg.worker_kind) as pool:
            reader.use_pool(pool, 2 * cfg.workers)
            for run, (blob, places) in ordered_map(pack_run, runs, pool, 2 * cfg.workers):
                sink.add(run.split, run.first_id, blob, places)
                bases_done += len(run.coords) * cfg.window
                if progress:
                    progress(bases_done, reader.consumed_bytes, fasta_size)
        sink.finish_all()
    except OSError as exc:
        sink.abandon()
        where = f" ({exc.filename})" if exc.filename else ""
        raise out.write_error(f"write shards under {out.root}{where}", exc) from None
    except BaseException:
        sink.abandon()
        raise
    finally:
        reader.close()
    if not any(totals.windows for totals in stats.totals.values()):
        filtered = (f"; {len(plan.skipped_contigs)} contig(s) were left out by --contigs {cfg.contigs} "
                    f"(e.g. {plan.skipped_contigs[0]!r}; --contigs all keeps every contig)") if plan.skipped_contigs else ""
        raise ShardingError(
            f"no windows were produced from {cfg.fasta}: every interval is on a contig the FASTA lacks, "
            f"shorter than --window {cfg.window}, or all N{filtered}. Check the contig names and --window"
        )
    check_requested_splits(cfg, plan, stats)
    missing = plan.missing()
    if missing and cfg.strict:
        raise ShardingError(
            f"{len(missing)} contig(s) named by the splits are not in {cfg.fasta}: "
            f"{', '.join(sorted(missing)[:10])}. Use the matching assembly, or drop --strict to skip them"
        )
    manifest = build_manifest(cfg, identity, stats, {**kept, **sink.written}, plan, fasta_sha)
    try:
        out.write_manifest(manifest)
    except OSError as exc:
        raise out.write_error(f"write {out.root / MANIFEST_NAME}", exc) from None
    return manifest


def check_requested_splits(cfg: ShardConfig, plan, stats: RunStats) -> None:
    """A split the user asked for (train, --valid-chroms, --*-fraction) that came out empty is an error."""
    for split, option in plan.requested().items():
        if split in stats.totals and stats.totals[split].windows:
            continue
        seen = sorted(plan.seen)
        contigs = f"{len(seen)} contig(s): {', '.join(seen[:8])}{', ...' if len(seen) > 8 else ''}"
        if split == "train":
            raise ShardingError(
                f"the train split is empty: every window of {cfg.fasta} ({contigs}) went to another split. "
                "With too few contigs to hold whole ones out, hold out a fraction of windows instead: "
                "--valid-fraction 0.02 --test-fraction 0.02")
        raise ShardingError(
            f"split '{split}' is empty: {option} selected no window of {cfg.fasta} ({contigs}); name contigs "
            "the FASTA has (with or without the 'chr' prefix), or raise the fraction")


def build_manifest(cfg: ShardConfig, identity: dict, stats: RunStats, shards: dict, plan, fasta_sha: str) -> dict:
    per_shard = cfg.resolved_samples_per_shard()
    splits = {}
    for split in sorted(plan.split_names() | stats.totals.keys()):
        totals = stats.totals.get(split, SplitTotals())
        count = -(-totals.windows // per_shard)
        entries = [shards[(split, number)] for number in range(count)]
        if sum(e["samples"] for e in entries) != totals.windows:
            raise ShardingError(f"internal error: shard sample counts of split {split!r} do not add up")
        splits[split] = {**totals.as_dict(), "shards": entries}
    missing = plan.missing()
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "created_by": f"caduceus-dist {__version__} data_prep/shard_genome.py",
        "args": identity, "assembly": cfg.resolved_assembly(),
        "fasta": {"path": cfg.fasta, "sha256": fasta_sha, "records": stats.records, "bases": stats.fasta_bases,
                  "iupac_to_n": stats.iupac_to_n},
        "window": cfg.window, "samples_per_shard": per_shard, "tiling": identity["tiling"],
        "splits": splits,
        "skipped": {"missing_contigs": missing, "filtered_contigs": len(plan.skipped_contigs)},
        **({"bed": {"bases": stats.bed_bases, "bases_in_windows": stats.bed_bases_stored}} if cfg.bed else {}),
    }
