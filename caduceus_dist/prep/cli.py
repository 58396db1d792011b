"""Command line of `data_prep/shard_genome.py` (argument parsing, progress bar, messages, exit codes).

With no arguments it shards the embedded hg38 sample into ./data/shards/sample, so the first command a
newcomer runs works. Errors users can cause print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from caduceus_dist.prep.collection import COLLECTION_NAME, shard_collection
from caduceus_dist.prep.download import DOWNLOADS, DownloadError, download_assembly
from caduceus_dist.prep.fasta import FastaError
from caduceus_dist.prep.sharding import ShardConfig, ShardingError, sample_config, shard_genome
from caduceus_dist.prep.splits import CONTIG_FILTERS, HOLDOUT_UNITS, SplitError
from caduceus_dist.prep.tiling import TilingError
from caduceus_dist.prep.verify import format_report, verify_dataset
from caduceus_dist.prep.workers import WORKER_KINDS
from caduceus_dist.shard_format import ShardFormatError

USER_ERRORS = (FastaError, SplitError, TilingError, ShardingError, ShardFormatError, DownloadError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT


def _chrom_list(text: str) -> list[str]:
    return [c for c in (part.strip() for part in text.split(",")) if c]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shard_genome.py",
        description="Turn a genome FASTA (+ split BED) into WebDataset shards of token ids. "
        "Without arguments: shard the embedded hg38 sample into ./data/shards/sample.",
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--fasta", help="genome FASTA: plain, gzip or BGZF (default: the embedded sample)")
    io.add_argument("--bed", help="split BED: chrom, start, end, split (train/valid/test) or fold label")
    io.add_argument("--split-map", help="fold label -> split, e.g. fold3=test,fold4=valid,*=train")
    io.add_argument("--valid-chroms", type=_chrom_list, default=[], help="without --bed: comma-separated valid contigs")
    io.add_argument("--test-chroms", type=_chrom_list, default=[], help="without --bed: comma-separated test contigs")
    io.add_argument("--valid-fraction", type=float, default=0.0,
                    help="without --bed: hold out this fraction of windows (chosen at random, seeded) as valid, "
                    "for genomes with too few contigs to hold whole ones out (e.g. 0.02)")
    io.add_argument("--test-fraction", type=float, default=0.0, help="without --bed: the same for test")
    io.add_argument("--split-seed", type=int, default=0, help="seed of the windows --*-fraction holds out (default: 0)")
    io.add_argument("--holdout", choices=HOLDOUT_UNITS, default="windows",
                    help="what --*-fraction holds out: windows (default) or whole contigs, each drawn by a hash of "
                    "(seed, contig): for genomes with many contigs, as GPN holds out chromosomes")
    io.add_argument("--contigs", default="primary",
                    help=f"without --bed: contigs to keep for train: {' | '.join(CONTIG_FILTERS)} | a regex (default: primary)")
    io.add_argument("--out", help="output directory (default: ./data/shards/sample for the sample)")
    io.add_argument("--collection", metavar="YAML",
                    help="shard every genome of a collection file into OUT/NAME, genomes in parallel up to --workers "
                    "(caduceus_dist/sample/mixture.yaml is an example; docs/data-prep.md, 'Collections')")
    io.add_argument("--assembly", help="assembly name stored with every sample (default: FASTA file name)")
    win = parser.add_argument_group("windows and shards")
    win.add_argument("--window", type=int, help="bases per stored window (default 131072; 8192 for the sample)")
    win.add_argument("--tiling", choices=["reference", "tile"],
                     help="reference: docs/reference-recipe.md §2 (rows extended to 2^20, clamped); tile: non-overlapping "
                     "(default: reference with --bed, tile without; tile for the sample)")
    win.add_argument("--samples-per-shard", type=int, help="windows per shard (default: 2^27 bases / window)")
    win.add_argument("--max-n-fraction", type=float, default=None, metavar="F",
                     help="drop (and count) windows with more than F of their bases N (default: only all-N windows)")
    run = parser.add_argument_group("behaviour")
    run.add_argument("--workers", type=int, default=1,
                     help="parallel decompression (BGZF) and compression workers (default: 1); the output is "
                     "byte-identical for any number of workers")
    run.add_argument("--worker-kind", choices=sorted(WORKER_KINDS), default="threads",
                     help="threads (default; zlib and numpy release the GIL, no copying) or processes")
    run.add_argument("--strict", action="store_true", help="IUPAC codes and contigs missing from the FASTA are errors")
    run.add_argument("--overwrite", action="store_true", help="replace shards made with different arguments")
    run.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    other = parser.add_argument_group("other modes")
    other.add_argument("--verify", metavar="DIR", help="reread every shard of DIR and check it against its manifest")
    other.add_argument("--download", choices=sorted(DOWNLOADS), help="fetch the reference inputs (docs/reference-recipe.md §1)")
    other.add_argument("--data-dir", default="data", help="--download: where to put the files, under NAME/ (default: data)")
    other.add_argument("--mirror", help="--download: base URL holding the same file names")
    return parser


def config_from_args(args: argparse.Namespace) -> ShardConfig:
    common = dict(
        out=args.out, bed=args.bed, split_map=args.split_map, valid_chroms=args.valid_chroms,
        test_chroms=args.test_chroms, contigs=args.contigs, valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction, split_seed=args.split_seed, holdout=args.holdout, window=args.window,
        tiling=args.tiling,
        samples_per_shard=args.samples_per_shard, max_n_fraction=args.max_n_fraction,
        assembly=args.assembly,
        strict=args.strict, workers=args.workers, worker_kind=args.worker_kind, overwrite=args.overwrite,
        quiet=args.quiet,
    )
    if args.fasta is None:
        if args.bed or args.split_map or args.valid_chroms or args.test_chroms or args.valid_fraction or args.test_fraction:
            raise ShardingError("--bed/--split-map/--*-chroms/--*-fraction need --fasta "
                                "(run without them to shard the sample)")
        return sample_config(**common)
    if args.out is None:
        raise ShardingError("--out is required with --fasta (the directory to write the shards to)")
    return ShardConfig(fasta=args.fasta, **{k: v for k, v in common.items() if v is not None})


class Progress:
    """tqdm bar over the input file (so the ETA is right) that shows bases/s; off when quiet or not a TTY."""

    def __init__(self, quiet: bool):
        self.bar = None
        self.bases = 0  # written by this run (0: every shard was already there)
        self.enabled = not quiet and sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, bases: int, consumed: int, total: int) -> None:
        self.bases = bases
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="input", file=sys.stderr, leave=False)
        self.bar.update(consumed - self.bar.n)
        rate = bases / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{bases / 1e6:.1f} Mbp written, {rate / 1e6:.1f} Mbp/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


LOW_BED_COVERAGE = 0.5  # warn when the windows hold less than this fraction of a BED's bases


def summary(manifest: dict, out: str, seconds: float, bases_written: int) -> str:
    """What the run did, per split, and what the user may want to change (one line each)."""
    lines = []
    for split, info in manifest["splits"].items():
        lines.append(f"  {split}: {info['windows']} windows in {len(info['shards'])} shard(s), "
                     f"{info['n_bases']} N bases, {info.get('softmasked_bases', 0)} soft-masked, "
                     f"{info['dropped_windows']} windows dropped for N "
                     f"({'all N' if manifest['args'].get('max_n_fraction') is None else 'over --max-n-fraction'})")
    layout = f"{manifest['window']}-base windows, {manifest['tiling']} tiling"
    if bases_written:
        head = f"wrote {out} ({layout}) in {seconds:.1f} s, {bases_written / seconds / 1e6:.1f} Mbp/s"
    else:
        head = f"{out} is already complete ({layout}): same arguments and input, every shard intact; nothing written"
    args, notes = manifest["args"], []
    held = [f"{args[f'{split}_fraction']:g} of the {args.get('holdout', 'windows')} as {split}" for split in ("valid", "test")
            if args.get(f"{split}_fraction")]
    if held:
        notes.append(f"note: held out {' and '.join(held)} at random (--split-seed {args['split_seed']})")
    if not manifest["splits"].get("valid", {}).get("windows"):
        notes.append("warning: no 'valid' windows: training will run without validation. Hold out windows with "
                     "--valid-fraction 0.02 (or whole contigs with --valid-chroms) to measure it")
    if "bed" in manifest:
        bed, stored = manifest["bed"]["bases"], manifest["bed"]["bases_in_windows"]
        lines.append(f"  BED intervals: {bed / 1e6:.2f} Mbp, of which {stored / 1e6:.2f} Mbp "
                     f"({100 * stored / max(bed, 1):.1f}%) are in stored windows")
        if manifest["tiling"] == "reference" and stored < LOW_BED_COVERAGE * bed:
            notes.append(f"warning: the reference tiling keeps only the first 2^20 bases of each BED row "
                         f"({stored / 1e6:.2f} of {bed / 1e6:.2f} Mbp here), as the Caduceus recipe does for its "
                         "hg38 rows; --tiling tile covers whole rows")
    if manifest["fasta"]["iupac_to_n"]:
        notes.append(f"note: {manifest['fasta']['iupac_to_n']} IUPAC ambiguity bases were stored as N (--strict forbids)")
    missing = manifest["skipped"]["missing_contigs"]
    if missing:
        notes.append(f"warning: {len(missing)} contig(s) of the splits are not in the FASTA and were skipped: "
                     f"{', '.join(sorted(missing)[:10])} (--strict makes this an error)")
    if manifest["skipped"]["filtered_contigs"]:
        notes.append(f"note: {manifest['skipped']['filtered_contigs']} contig(s) left out by --contigs")
    return "\n".join([head, *lines, *notes])


SINGLE_GENOME_ARGS = ("fasta", "bed", "split_map", "valid_chroms", "test_chroms", "valid_fraction", "test_fraction",
                      "window", "tiling", "samples_per_shard", "max_n_fraction", "assembly")


def _collection(args: argparse.Namespace) -> int:
    given = [f"--{k.replace('_', '-')}" for k in SINGLE_GENOME_ARGS if getattr(args, k)]
    if given:
        raise ShardingError(f"--collection takes its genomes' settings from the YAML file; drop {', '.join(given)} "
                            "(or set them there, at the top for every genome)")
    if args.out is None:
        raise ShardingError("--out is required with --collection (each genome goes to OUT/NAME)")
    start = time.perf_counter()
    collection = shard_collection(args.collection, args.out, args.workers, args.overwrite,
                                  report=(lambda _line: None) if args.quiet else (lambda line: print(line, file=sys.stderr)))
    if not args.quiet:
        print(f"wrote {args.out}/{COLLECTION_NAME}: {len(collection['genomes'])} genomes in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verify:
            report = verify_dataset(args.verify)
            print(format_report(report), file=sys.stdout if report.ok else sys.stderr)
            return 0 if report.ok else 1
        if args.download:
            paths = download_assembly(args.download, Path(args.data_dir) / args.download, mirror=args.mirror)
            fasta, bed = paths["hg38.ml.fa.gz"], paths["sequences_human.bed"]
            print(f"downloaded {', '.join(map(str, paths.values()))}\nnext: python data_prep/shard_genome.py "
                  f"--fasta {fasta} --bed {bed} --out data/shards/hg38 --workers 8")
            return 0
        if args.collection:
            return _collection(args)
        cfg = config_from_args(args)
        progress = Progress(cfg.quiet)
        start = time.perf_counter()
        try:
            manifest = shard_genome(cfg, progress)
        finally:
            progress.close()
        if not cfg.quiet:
            print(summary(manifest, cfg.out, max(time.perf_counter() - start, 1e-9), progress.bases), file=sys.stderr)
        return 0
    except USER_ERRORS as exc:
        print(f"shard_genome.py: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("shard_genome.py: interrupted; finished shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
