"""Which parts of which contigs go to which split: BED with a split column, BED with folds, or whole contigs.

Each split mode is a `SplitPlan`: given a contig name (as the FASTA stream reaches it), it
returns that contig's labelled intervals in a fixed order (BED file order, or the whole contig), and at
the end reports what the FASTA never provided. Modes live in `SPLIT_MODES`; `make_split_plan` picks one.
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SPLIT_COLUMN_LABELS = ("train", "valid", "test")
CONTIG_END = 1 << 62  # "to the end of the contig" for whole-contig intervals
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
HOLDOUT_UNITS = ("windows", "contigs")  # what --valid-fraction / --test-fraction hold out

# Contig filters for whole-contig mode: primary assembly chromosomes with or without the "chr" prefix.
CONTIG_FILTERS = {
    "primary": r"^(chr)?([0-9]+|X|Y|M|MT)$",
    "all": r".*",
}


class SplitError(ValueError):
    """Bad split input (BED line, split map, chromosome list); the message names the file/line/option."""


@dataclass(frozen=True)
class Interval:
    chrom: str
    start: int
    end: int
    split: str
    source_line: int  # 1-based BED line, 0 for a whole contig


@dataclass
class BedRow:
    line: int
    chrom: str
    start: int
    end: int
    label: str


def _open_text(path: Path):
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt") if gzipped else open(path)


def read_bed(path: str | Path, need_label: bool) -> list[BedRow]:
    """Parse a BED file (plain or gzip); comments, `track`/`browser` lines and blank lines are skipped.
    The 4th column, where present, is the row's label (a split, a fold, or a region's name)."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"BED file {path} does not exist; pass --bed PATH (or leave --bed out to split whole contigs)")
    rows = []
    min_columns = 4 if need_label else 3
    try:
        with _open_text(path) as fh:
            for number, text in enumerate(fh, start=1):
                fields = text.rstrip("\r\n").split("\t")
                if not text.strip() or text.startswith(("#", "track", "browser")):
                    continue
                if len(fields) < min_columns:
                    fields = text.split()  # tolerate space-separated BED
                if len(fields) < min_columns:
                    raise SplitError(
                        f"{path}, line {number}: {len(fields)} column(s), need at least {min_columns} "
                        "(chrom, start, end, split label). Fix or remove the line"
                    )
                try:
                    start, end = int(fields[1]), int(fields[2])
                except ValueError:
                    raise SplitError(
                        f"{path}, line {number}: start/end {fields[1]!r}, {fields[2]!r} are not integers"
                    ) from None
                if start < 0 or start >= end:
                    raise SplitError(
                        f"{path}, line {number}: start {start} must be >= 0 and < end {end} "
                        "(BED is 0-based, half-open). Fix or remove the line"
                    )
                rows.append(BedRow(number, fields[0], start, end, fields[3] if len(fields) > 3 else ""))
    except (EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise SplitError(f"{path}: unreadable ({exc}); is it a (gzipped) text BED file?") from None
    if not rows:
        raise SplitError(f"{path} holds no BED intervals")
    return rows


def parse_split_map(text: str) -> dict[str, str]:
    """`fold3=test,fold4=valid,*=train` -> {'fold3': 'test', 'fold4': 'valid', '*': 'train'}."""
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        label, sep, split = item.partition("=")
        if not sep or not label or not SPLIT_NAME.match(split):
            raise SplitError(
                f"--split-map item {item!r} is not LABEL=SPLIT (example: fold3=test,fold4=valid,*=train)"
            )
        mapping[label] = split
    if not mapping:
        raise SplitError("--split-map is empty (example: fold3=test,fold4=valid,*=train)")
    return mapping


@dataclass
class SplitPlan:
    """Base: per-contig intervals plus bookkeeping of contigs the FASTA did (not) provide."""

    seen: set[str] = field(default_factory=set)
    skipped_contigs: list[str] = field(default_factory=list)

    def intervals(self, chrom: str) -> list[Interval]:
        """The intervals of `chrom`, in output order; a whole contig ends at CONTIG_END (clipped by tiling)."""
        raise NotImplementedError

    def missing(self) -> dict[str, int]:
        """Contigs the plan wanted but the FASTA never had: name -> number of intervals (rows)."""
        raise NotImplementedError

    def split_names(self) -> set[str]:
        """Every split the plan can produce (listed in the manifest even when it ends up empty)."""
        raise NotImplementedError

    def window_split(self, interval: Interval, start: int) -> str:
        """The split of the window starting at `start` in `interval` (its interval's, unless a mode holds
        out single windows)."""
        return interval.split

    def requested(self) -> dict[str, str]:
        """Splits the user asked for by an option (split -> the option), which must not come out empty."""
        return {}


@dataclass
class BedSplitPlan(SplitPlan):
    rows_by_chrom: dict[str, list[Interval]] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: list[BedRow], label_to_split) -> BedSplitPlan:
        grouped: dict[str, list[Interval]] = defaultdict(list)
        for row in rows:
            grouped[row.chrom].append(Interval(row.chrom, row.start, row.end, label_to_split(row), row.line))
        return cls(rows_by_chrom=dict(grouped))

    def intervals(self, chrom: str) -> list[Interval]:
        self.seen.add(chrom)
        return self.rows_by_chrom.get(chrom, [])

    def missing(self) -> dict[str, int]:
        return {c: len(rows) for c, rows in self.rows_by_chrom.items() if c not in self.seen}

    def split_names(self) -> set[str]:
        return {interval.split for rows in self.rows_by_chrom.values() for interval in rows}


def _split_column_plan(bed: Path, split_map: str | None, **_) -> SplitPlan:
    def label_to_split(row: BedRow) -> str:
        if row.label not in SPLIT_COLUMN_LABELS:
            raise SplitError(
                f"{bed}, line {row.line}: split label {row.label!r} is not one of {', '.join(SPLIT_COLUMN_LABELS)}. "
                "For fold labels pass a mapping, e.g. --split-map fold3=test,fold4=valid,*=train"
            )
        return row.label

    return BedSplitPlan.from_rows(read_bed(bed, need_label=True), label_to_split)


def _fold_plan(bed: Path, split_map: str, **_) -> SplitPlan:
    mapping = parse_split_map(split_map)

    def label_to_split(row: BedRow) -> str:
        split = mapping.get(row.label, mapping.get("*"))
        if split is None:
            raise SplitError(
                f"{bed}, line {row.line}: label {row.label!r} is not in --split-map {split_map!r} and there is "
                "no '*=SPLIT' default. Add it to the map"
            )
        return split

    return BedSplitPlan.from_rows(read_bed(bed, need_label=True), label_to_split)


def bare_contig(name: str) -> str:
    """A contig name without a leading "chr" (so chr20 and 20 name the same contig)."""
    return name[3:] if name[:3].lower() == "chr" else name


@dataclass
class ContigSplitPlan(SplitPlan):
    """Whole contigs: listed valid/test contigs, every other contig that passes the filter is train, except
    what a seeded fraction holds out: windows (`holdout` "windows", for genomes with too few contigs to hold
    whole ones out) or whole contigs ("contigs", as GPN holds out chromosomes per species)."""

    chrom_to_split: dict[str, str] = field(default_factory=dict)  # the user's contig names
    contig_filter: re.Pattern = re.compile(".*")
    fractions: dict[str, float] = field(default_factory=dict)  # split -> fraction of train windows held out
    seed: int = 0
    holdout: str = "windows"  # what a fraction draws: HOLDOUT_UNITS
    options: dict[str, str] = field(default_factory=dict)  # split -> the option that asked for it

    def __post_init__(self) -> None:
        self._by_bare = {bare_contig(c): split for c, split in self.chrom_to_split.items()}

    def intervals(self, chrom: str) -> list[Interval]:
        self.seen.add(chrom)
        split = self._by_bare.get(bare_contig(chrom))
        if split is None:
            if not self.contig_filter.match(chrom):
                self.skipped_contigs.append(chrom)
                return []
            split = self._drawn(chrom) if self.holdout == "contigs" else "train"
        return [Interval(chrom, 0, CONTIG_END, split, 0)]

    def window_split(self, interval: Interval, start: int) -> str:
        if interval.split != "train" or self.holdout == "contigs":
            return interval.split
        return self._drawn(f"{interval.chrom}:{start}")

    def _drawn(self, key: str) -> str:
        """The split a seeded fraction gives `key` (a contig, or a contig's window): a hash of (seed, key)
        against the cumulative fractions, so the same key lands in the same split in every run."""
        digest = hashlib.blake2b(f"{self.seed}:{key}".encode(), digest_size=8).digest()
        draw, bound = int.from_bytes(digest, "little") / 2**64, 0.0
        for split, fraction in self.fractions.items():
            bound += fraction
            if draw < bound:
                return split
        return "train"

    def missing(self) -> dict[str, int]:
        seen = {bare_contig(c) for c in self.seen}
        return {c: 1 for c in self.chrom_to_split if bare_contig(c) not in seen}

    def split_names(self) -> set[str]:
        return {"train", *self.chrom_to_split.values(), *self.fractions}

    def requested(self) -> dict[str, str]:
        return {"train": "--contigs", **self.options}


def _contig_plan(valid_chroms: list[str], test_chroms: list[str], contigs: str, valid_fraction: float = 0.0,
                 test_fraction: float = 0.0, split_seed: int = 0, holdout: str = "windows", **_) -> SplitPlan:
    chrom_to_split = {c: "valid" for c in valid_chroms}
    for chrom in test_chroms:
        if bare_contig(chrom) in {bare_contig(c) for c in chrom_to_split}:
            raise SplitError(f"contig {chrom!r} is in both --valid-chroms and --test-chroms")
        chrom_to_split[chrom] = "test"
    fractions = {split: f for split, f in (("valid", valid_fraction), ("test", test_fraction)) if f}
    for split, fraction in fractions.items():
        if not 0 < fraction < 1:
            raise SplitError(f"--{split}-fraction must be between 0 and 1, got {fraction}")
    if sum(fractions.values()) >= 1:
        raise SplitError(f"--valid-fraction + --test-fraction must be < 1, got {sum(fractions.values())}")
    if holdout not in HOLDOUT_UNITS:
        raise SplitError(f"--holdout must be one of {', '.join(HOLDOUT_UNITS)}, got {holdout!r}")
    options = {"valid": f"--valid-chroms {','.join(valid_chroms)}" if valid_chroms else None,
               "test": f"--test-chroms {','.join(test_chroms)}" if test_chroms else None}
    for split, fraction in fractions.items():
        options[split] = (f"--{split}-fraction {fraction} --holdout {holdout}"
                          + (f" and {options[split]}" if options[split] else ""))
    pattern = CONTIG_FILTERS.get(contigs, contigs)
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise SplitError(
            f"--contigs {contigs!r} is neither {' nor '.join(CONTIG_FILTERS)} nor a valid regular expression ({exc})"
        ) from None
    return ContigSplitPlan(chrom_to_split=chrom_to_split, contig_filter=compiled, fractions=fractions,
                           seed=split_seed, holdout=holdout, options={k: v for k, v in options.items() if v})


SPLIT_MODES = {
    "bed-split-column": _split_column_plan,
    "bed-fold-map": _fold_plan,
    "whole-contigs": _contig_plan,
}


def split_mode_for(bed: str | None, split_map: str | None) -> str:
    if bed is None:
        if split_map:
            raise SplitError("--split-map needs --bed (it maps the BED's fold labels to splits)")
        return "whole-contigs"
    return "bed-fold-map" if split_map else "bed-split-column"


def make_split_plan(
    bed: str | None, split_map: str | None, valid_chroms: list[str], test_chroms: list[str], contigs: str,
    valid_fraction: float = 0.0, test_fraction: float = 0.0, split_seed: int = 0, holdout: str = "windows",
) -> SplitPlan:
    mode = split_mode_for(bed, split_map)
    if bed is not None and (valid_chroms or test_chroms or valid_fraction or test_fraction):
        raise SplitError("--valid-chroms/--test-chroms/--*-fraction apply only without --bed "
                         "(the BED already assigns splits)")
    return SPLIT_MODES[mode](
        bed=Path(bed) if bed else None, split_map=split_map, valid_chroms=valid_chroms,
        test_chroms=test_chroms, contigs=contigs, valid_fraction=valid_fraction, test_fraction=test_fraction,
        split_seed=split_seed, holdout=holdout,
    )
