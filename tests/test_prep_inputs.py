"""Sharder inputs: streaming FASTA reader, BED/split modes, tiling modes (fast, embedded sample only)."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from caduceus_dist.prep import fasta as fasta_mod
from caduceus_dist.prep.fasta import FastaError, FastaReader
from caduceus_dist.prep.splits import Interval, SplitError, make_split_plan, parse_split_map, read_bed
from caduceus_dist.prep.tiling import (
    REFERENCE_SPAN,
    TilingError,
    reference_windows,
    resolve_tiling,
    tile_windows,
)

SAMPLE = Path(__file__).resolve().parents[1] / "caduceus_dist" / "sample"
# Independent of the tokenizer's table: the reference vocabulary (docs/reference-model.md §8), IUPAC -> N.
EXPECTED_ID = {**{b: i for b, i in zip("ACGTN", range(7, 12), strict=True)}, **dict.fromkeys("RYSWKMBDHVU", 11)}


def plain_parse(text: str) -> dict[str, np.ndarray]:
    """A deliberately naive FASTA parse, used as the independent reference: token ids, plus 16 for a
    lower-case a, c, g, t or n (soft-masked; shard format v2), IUPAC codes a plain N."""
    records, name = {}, None
    for line in text.splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            records[name] = []
        elif line.strip():
            records[name].append(line.strip())
    return {k: np.array([EXPECTED_ID[c.upper()] + 16 * (c in "acgtn") for c in "".join(v)], dtype=np.uint8)
            for k, v in records.items()}


def sample_text() -> str:
    return gzip.decompress((SAMPLE / "hg38_sample.fa.gz").read_bytes()).decode()


def rewrap(text: str, width: int, lower_every: int = 0) -> str:
    """Same records at another line width; optionally soft-mask (lower-case) every n-th base."""
    out = []
    for name, seq in ((k, "".join(v)) for k, v in _records(text).items()):
        if lower_every:
            seq = "".join(c.lower() if i % lower_every == 0 else c for i, c in enumerate(seq))
        out.append(f">{name} some description\n")
        out += [seq[i:i + width] + "\n" for i in range(0, len(seq), width)]
    return "".join(out)


def _records(text: str) -> dict[str, list[str]]:
    records, name = {}, None
    for line in text.splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            records[name] = []
        else:
            records[name].append(line)
    return records


def write_bgzf(path: Path, data: bytes, block: int = 65280) -> None:
    """Minimal BGZF writer (the BGZF block layout of the SAM/BAM format): gzip members with a BC extra field, plus the EOF block."""
    with open(path, "wb") as fh:
        for i in range(0, len(data), block):
            chunk = data[i:i + block]
            deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
            payload = deflater.compress(chunk) + deflater.flush()
            bsize = 18 + len(payload) + 8 - 1
            fh.write(b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff\x06\x00BC\x02\x00" + struct.pack("<H", bsize))
            fh.write(payload + struct.pack("<II", zlib.crc32(chunk), len(chunk)))
        fh.write(bytes.fromhex("1f8b08040000000000ff0600424302001b0003000000000000000000"))


def read_all(path: Path, strict: bool = False) -> dict[str, np.ndarray]:
    reader = FastaReader(path, strict=strict)
    try:
        return {r.name: r.tokens.copy() for r in reader}
    finally:
        reader.close()


@pytest.mark.parametrize("width", [60, 7, 1000, 10**6])
@pytest.mark.parametrize("codec", ["plain", "gzip", "bgzf"])
def test_reader_matches_plain_parse_any_width_and_codec(tmp_path, monkeypatch, width, codec):
    monkeypatch.setattr(fasta_mod, "CHUNK_BYTES", 4099)  # many chunk boundaries inside lines and headers
    text = rewrap(sample_text(), width, lower_every=3)
    path = tmp_path / f"x.{codec}"
    if codec == "plain":
        path.write_text(text)
    elif codec == "gzip":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        write_bgzf(path, text.encode())
    got, want = read_all(path), plain_parse(text)
    assert list(got) == list(want) == ["chr22:16600000-16800000", "chrM"]
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_crlf_and_blank_lines(tmp_path):
    path = tmp_path / "crlf.fa"
    path.write_bytes(b">a\r\nACGT\r\nnnGG\r\n\r\n>b desc\r\nTTTT\r\n")
    got = read_all(path)
    assert got["a"].tolist() == [7, 8, 9, 10, 27, 27, 9, 9] and got["b"].tolist() == [10] * 4  # nn: soft-masked N


def test_iupac_codes_become_n_and_are_counted(tmp_path):
    path = tmp_path / "iupac.fa"
    path.write_text(">x\nACRYGT\nswn\n")
    (record,) = list(FastaReader(path))
    assert record.tokens.tolist() == [7, 8, 11, 11, 9, 10, 11, 11, 27] and record.iupac_bases == 4  # n: soft-masked


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"ACGT\n>x\nACGT\n", "line 1: sequence before the first '>' header"),
        (b">x\nACGT\n>empty\n>y\nAC\n", "line 3: record 'empty' is empty"),
        (b">x\nACGT\n>y\nAC\n>x\nGG\n", "line 5: duplicate record name 'x' (first on line 1)"),
        (b">x\nAC>GT\n", "'>' in the middle of a sequence line"),
        (b">x\nACGT\n>\nAC\n", "line 3: empty header"),
        (b">x\nAC1T\n", "record 'x' (header on line 1) has '1' at base 3 (1-based), which is not a nucleotide"),
        (b"", "holds no FASTA records"),
    ],
)
def test_malformed_fasta_errors_name_the_line_or_record(tmp_path, content, message):
    path = tmp_path / "bad.fa"
    path.write_bytes(content)
    with pytest.raises(FastaError) as err:
        read_all(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_strict_rejects_iupac_with_position(tmp_path):
    path = tmp_path / "iupac.fa"
    path.write_text(">chrQ\nACGTACGTAC\nGTRA\n")
    with pytest.raises(FastaError, match=r"record 'chrQ' .* has 'R' at base 13 .*IUPAC.*without --strict"):
        read_all(path, strict=True)


def test_truncated_gzip_names_file_and_record(tmp_path, monkeypatch):
    monkeypatch.setattr(fasta_mod, "CHUNK_BYTES", 1 << 16)
    data = gzip.compress(sample_text().encode())
    path = tmp_path / "cut.fa.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FastaError, match=r"gzip stream is truncated or corrupt .*record 'chr22:16600000-16800000'"):
        read_all(path)


def test_other_compression_is_named(tmp_path):
    path = tmp_path / "x.fa.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 10)
    with pytest.raises(FastaError, match=r"zstd-compressed; .*Recompress it with gzip or bgzip"):
        FastaReader(path)


# ------------------------------------------------------------------------------------------ BED and splits

def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chr1\t0\t100\ttrain\nchr1\t5\n", "line 2: 2 column(s), need at least 4"),
        ("# header\nchr1\t100\t100\ttrain\n", "line 2: start 100 must be >= 0 and < end 100"),
        ("chr1\t200\t100\ttrain\n", "line 1: start 200 must be >= 0 and < end 100"),
        ("chr1\tzero\t100\ttrain\n", "line 1: start/end 'zero', '100' are not integers"),
    ],
)
def test_bad_bed_lines_are_reported_with_line_numbers(tmp_path, text, message):
    bed = write(tmp_path / "bad.bed", text)
    with pytest.raises(SplitError) as err:
        read_bed(bed, need_label=True)
    assert message in str(err.value) and str(bed) in str(err.value)


def test_split_column_mode_rejects_fold_labels_and_suggests_map(tmp_path):
    bed = write(tmp_path / "folds.bed", "chr1\t0\t10\tfold3\n")
    with pytest.raises(SplitError, match=r"line 1: split label 'fold3' .*--split-map fold3=test"):
        make_split_plan(str(bed), None, [], [], "primary")


def test_fold_map_maps_labels_and_default(tmp_path):
    bed = write(tmp_path / "folds.bed.gz", "")
    bed.write_bytes(gzip.compress(b"chr1\t0\t10\tfold3\nchr2\t5\t9\tfold4\nchr1\t20\t30\tfold0\n"))
    plan = make_split_plan(str(bed), "fold3=test,fold4=valid,*=train", [], [], "primary")
    assert [(i.start, i.split, i.source_line) for i in plan.intervals("chr1")] == [(0, "test", 1), (20, "train", 3)]
    assert plan.missing() == {"chr2": 1}


def test_fold_map_without_default_names_the_label(tmp_path):
    bed = write(tmp_path / "folds.bed", "chr1\t0\t10\tfold3\nchr1\t10\t20\tfold7\n")
    with pytest.raises(SplitError, match=r"line 2: label 'fold7' is not in --split-map"):
        make_split_plan(str(bed), "fold3=test", [], [], "primary")


@pytest.mark.parametrize("text", ["fold3", "fold3=", "=test", "fold3=te st", ","])
def test_bad_split_map(text):
    with pytest.raises(SplitError, match="split-map"):
        parse_split_map(text)


def test_whole_contig_mode_primary_filter_and_lists():
    plan = make_split_plan(None, None, ["chr8"], ["chr9", "chrQ"], "primary")
    names = ["chr1", "chr8", "chr9", "chr1_KI270706v1_random", "chrUn_GL000195v1", "chrEBV", "chr6_GL000250v2_alt",
             "chrX", "chrM", "20", "MT"]
    got = {n: [i.split for i in plan.intervals(n)] for n in names}
    assert got == {"chr1": ["train"], "chr8": ["valid"], "chr9": ["test"], "chr1_KI270706v1_random": [],
                   "chrUn_GL000195v1": [], "chrEBV": [], "chr6_GL000250v2_alt": [], "chrX": ["train"],
                   "chrM": ["train"], "20": ["train"], "MT": ["train"]}
    assert len(plan.skipped_contigs) == 4 and plan.missing() == {"chrQ": 1}
    assert [i.split for i in make_split_plan(None, None, [], [], "all").intervals("chrEBV")] == ["train"]


def test_contig_lists_conflict_and_bad_regex():
    with pytest.raises(SplitError, match="'chr8' is in both"):
        make_split_plan(None, None, ["chr8"], ["chr8"], "primary")
    with pytest.raises(SplitError, match="--contigs '\\(' is neither"):
        make_split_plan(None, None, [], [], "(")


# ------------------------------------------------------------------------------------------ tiling

def reference_spec_windows(rows: list[tuple[int, int]], contig_length: int, max_length: int) -> list[tuple[int, int]]:
    """Spec 3.2 transcribed literally: dataset index i -> row i // shifts, shift k = i % shifts."""
    shifts = REFERENCE_SPAN // max_length
    out = []
    for i in range(len(rows) * shifts):
        row_start = rows[i // shifts][0]
        start = row_start + (i % shifts) * max_length
        end = start + max_length
        if end > contig_length:
            start, end = start - (end - contig_length), contig_length
        if start < 0:
            start, end = 0, end - start
        if end > contig_length:  # the final guard
            start, end = contig_length - max_length, contig_length
        out.append((start, end))
    return out


@pytest.mark.parametrize("window", [1 << 17, 1 << 15, 1 << 20])
def test_reference_tiling_matches_the_reference_recipe(window):
    length = 5_000_000
    rows = [(0, 131072), (1_000_000, 1_131_072), (4_500_000, 4_631_072), (length - 1000, length)]
    got = [w for start, end in rows for w in reference_windows(Interval("c", start, end, "train", 0), length, window)]
    assert got == reference_spec_windows(rows, length, window)
    assert all(end - start == window for start, end in got)


def test_tile_tiling_clips_to_contig_and_drops_remainder():
    got = list(tile_windows(Interval("c", 10, 100, "train", 0), 75, 20))
    assert got == [(10, 30), (30, 50), (50, 70)]
    assert list(tile_windows(Interval("c", 0, 10, "train", 0), 5, 8)) == []


def test_tiling_errors():
    with pytest.raises(TilingError, match="divides 2\\^20"):
        resolve_tiling("reference", 100_000, has_bed=True)
    with pytest.raises(TilingError, match="needs --bed"):
        resolve_tiling("reference", 1024, has_bed=False)
    with pytest.raises(TilingError, match="positive"):
        resolve_tiling("tile", 0, has_bed=False)
    assert resolve_tiling(None, 1024, has_bed=True)[0] == "reference"
    assert resolve_tiling(None, 1000, has_bed=False)[0] == "tile"
