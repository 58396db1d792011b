"""Sharder end to end on the embedded real-hg38 sample: round trip, counts, determinism, resume, failures."""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyfaidx
import pytest
from test_data_fixtures import ShardWriter
from test_prep_inputs import EXPECTED_ID, reference_spec_windows, write_bgzf

from caduceus_dist.data.dataset import ShardSplit
from caduceus_dist.fsio import sha256_file
from caduceus_dist.prep import fasta as fasta_mod
from caduceus_dist.prep import output as output_mod
from caduceus_dist.prep import sharding
from caduceus_dist.prep.cli import main as cli_main
from caduceus_dist.prep.fasta import FastaError
from caduceus_dist.prep.output import STATE_DIR, ShardSink, pack_members
from caduceus_dist.prep.sharding import ShardConfig, ShardingError, sample_config, shard_genome
from caduceus_dist.prep.verify import verify_dataset
from caduceus_dist.shard_format import ShardReader, decode_members, load_manifest, read_index, sample_key

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "caduceus_dist" / "sample"
CHR22 = "chr22:16600000-16800000"


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def plain_fasta(src: Path, dest: Path) -> Path:
    """An uncompressed copy, so pyfaidx (an independent reader) can index it."""
    data = src.read_bytes()
    dest.write_bytes(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data)
    return dest


def _expected_table() -> np.ndarray:
    table = np.full(256, 255, dtype=np.uint8)  # 255: a letter the reference vocabulary has no id for
    for letter, token in EXPECTED_ID.items():
        table[ord(letter)] = table[ord(letter.lower())] = token
    return table


EXPECTED_TABLE = _expected_table()


def expected_ids(sequence: str) -> np.ndarray:
    return EXPECTED_TABLE[np.frombuffer(sequence.encode(), dtype=np.uint8)]


def soft_masked_letters(sequence: str) -> np.ndarray:
    """Where the FASTA has a lower-case a, c, g, t or n (IUPAC codes become a plain N)."""
    return np.isin(np.frombuffer(sequence.encode(), dtype=np.uint8), np.frombuffer(b"acgtn", dtype=np.uint8))


def expected_stored(sequence: str) -> np.ndarray:
    """Shard format v2 token bytes, written from docs/shard-format.md: id + 16 where lower case."""
    return expected_ids(sequence) + 16 * soft_masked_letters(sequence).astype(np.uint8)


def assert_round_trip(root: Path, fasta: Path) -> int:
    """Every stored window decodes to exactly the FASTA bases, and their case, at its recorded coordinates."""
    manifest = load_manifest(root)
    genome = pyfaidx.Fasta(str(fasta), rebuild=True)
    checked = 0
    for split, info in manifest["splits"].items():
        next_id = 0
        for entry in info["shards"]:
            reader = ShardReader(root / entry["tar"], root / entry["index"])
            for k in range(len(reader)):
                sample = reader.read(k)
                meta = sample.meta
                assert (meta["split"], meta["id"]) == (split, next_id)
                assert meta["end"] - meta["start"] == meta["length"] == manifest["window"]
                want = expected_stored(genome[meta["chrom"]][meta["start"]:meta["end"]].seq)
                np.testing.assert_array_equal(sample.tokens, want, err_msg=f"{split} sample {next_id} {meta}")
                assert meta["n_fraction"] == np.count_nonzero(want % 16 == 11) / len(want)
                next_id += 1
                checked += 1
            reader.close()
        assert next_id == info["windows"]
    return checked


def independent_counts(fasta: Path, rows: list[tuple[str, int, int, str]], window: int, tiling: str) -> dict:
    """Per-split windows/bases/N bases/dropped computed from the BED rows and pyfaidx, not the sharder."""
    genome = pyfaidx.Fasta(str(fasta), rebuild=True)
    counts: dict[str, dict] = {}
    for chrom, start, end, split in rows:
        c = counts.setdefault(split, {"windows": 0, "bases": 0, "n_bases": 0, "softmasked_bases": 0,
                                      "dropped_windows": 0})
        if chrom not in genome:
            continue
        length = len(genome[chrom])
        if tiling == "tile":
            spans = [(s, s + window) for s in range(start, min(end, length) - window + 1, window)]
        else:
            spans = reference_spec_windows([(start, end)], length, window) if length >= window else []
        for s, e in spans:
            seq = genome[chrom][s:e].seq
            n = int(np.count_nonzero(expected_ids(seq) == 11))  # N and IUPAC codes, either case
            if n == window:
                c["dropped_windows"] += 1
            else:
                c["windows"] += 1
                c["bases"] += window
                c["n_bases"] += n
                c["softmasked_bases"] += int(np.count_nonzero(soft_masked_letters(seq)))
    return counts


def manifest_counts(manifest: dict) -> dict:
    keys = ("windows", "bases", "n_bases", "softmasked_bases", "dropped_windows")
    return {split: {k: info[k] for k in keys} for split, info in manifest["splits"].items()}


def read_bed_rows(path: Path) -> list[tuple[str, int, int, str]]:
    rows = []
    for line in path.read_text().splitlines():
        chrom, start, end, split = line.split("\t")[:4]
        rows.append((chrom, int(start), int(end), split))
    return rows


@pytest.fixture
def sample_shards(tmp_path) -> tuple[Path, dict]:
    out = tmp_path / "sample"
    return out, shard_genome(sample_config(out=str(out), quiet=True))


# ------------------------------------------------------------------------------------------ correctness

def test_sample_round_trip_and_independent_counts(sample_shards, tmp_path):
    root, manifest = sample_shards
    fasta = plain_fasta(SAMPLE / "hg38_sample.fa.gz", tmp_path / "sample.fa")
    assert assert_round_trip(root, fasta) == 26
    rows = read_bed_rows(SAMPLE / "hg38_sample_splits.bed")
    assert manifest_counts(manifest) == independent_counts(fasta, rows, 8192, "tile")
    assert {s: i["windows"] for s, i in manifest["splits"].items()} == {"train": 22, "valid": 2, "test": 2}
    meta = ShardReader(root / "train/shard-000000.tar", root / "train/shard-000000.idx").read_meta(0)
    assert meta["assembly"] == "hg38" and meta["fasta_sha256"] == manifest["fasta"]["sha256"]
    assert meta["strand"] == "+"
    assert verify_dataset(root).ok


def _edited_sample(tmp_path: Path) -> Path:
    """The sample with real edits: an N run covering whole windows, soft-masking, IUPAC codes, width 50."""
    text = gzip.decompress((SAMPLE / "hg38_sample.fa.gz").read_bytes()).decode()
    records, name = {}, None
    for line in text.splitlines():
        if line.startswith(">"):
            name = line[1:]
            records[name] = []
        else:
            records[name].append(line)
    seq = list("".join(records[CHR22]))
    seq[40_000:75_000] = "N" * 35_000
    seq[90_000:90_010] = "acgtnRYKMS"
    for i in range(120_000, 130_000):
        seq[i] = seq[i].lower()
    records[CHR22] = ["".join(seq)]
    out = tmp_path / "edited.fa.gz"
    body = "".join(f">{n}\n" + "".join(s[i:i + 50] + "\n" for s in ["".join(v)] for i in range(0, len(s), 50))
                   for n, v in records.items())
    out.write_bytes(gzip.compress(body.encode()))
    return out


def test_reference_tiling_round_trip_with_n_runs_and_iupac(tmp_path):
    fasta = _edited_sample(tmp_path)
    bed = tmp_path / "rows.bed"
    rows = [(CHR22, 30_000, 160_000, "train"), (CHR22, 100_000, 131_072, "valid"), ("chrM", 0, 16569, "test"),
            (CHR22, 190_000, 200_001, "train")]
    bed.write_text("".join(f"{c}\t{s}\t{e}\t{sp}\n" for c, s, e, sp in rows))
    out = tmp_path / "ref"
    manifest = shard_genome(ShardConfig(fasta=str(fasta), bed=str(bed), out=str(out), window=1 << 14,
                                        samples_per_shard=16, quiet=True))
    plain = plain_fasta(fasta, tmp_path / "edited.fa")
    assert manifest["tiling"] == "reference"
    assert manifest_counts(manifest) == independent_counts(plain, rows, 1 << 14, "reference")
    assert manifest["splits"]["train"]["dropped_windows"] > 0 and manifest["fasta"]["iupac_to_n"] == 5
    assert assert_round_trip(out, plain) == sum(i["windows"] for i in manifest["splits"].values())
    with pytest.raises(FastaError, match="has 'R' at base 90006"):
        shard_genome(ShardConfig(fasta=str(fasta), bed=str(bed), out=str(tmp_path / "strict"), window=1 << 14,
                                 strict=True, quiet=True))


def test_whole_contig_and_fold_modes(tmp_path):
    fasta = str(SAMPLE / "hg38_sample.fa.gz")
    contigs = shard_genome(ShardConfig(fasta=fasta, out=str(tmp_path / "contigs"), window=4096,
                                       valid_chroms=["chrM"], contigs="all", quiet=True))
    assert contigs["tiling"] == "tile"
    assert {s: i["windows"] for s, i in contigs["splits"].items()} == {"train": 200_001 // 4096, "valid": 16569 // 4096}
    # The primary filter drops a record whose name is not a primary chromosome (the chr22 slice's region name).
    primary = shard_genome(ShardConfig(fasta=fasta, out=str(tmp_path / "primary"), window=4096, quiet=True))
    assert {s: i["windows"] for s, i in primary["splits"].items()} == {"train": 16569 // 4096}
    assert primary["skipped"]["filtered_contigs"] == 1
    folds = tmp_path / "folds.bed"
    folds.write_text(f"{CHR22}\t0\t100000\tfold0\n{CHR22}\t100000\t150000\tfold3\nchrM\t0\t16569\tfold4\n")
    mapped = shard_genome(sample_config(out=str(tmp_path / "folds"), bed=str(folds),
                                        split_map="fold3=test,fold4=valid,*=train", quiet=True))
    assert {s: i["windows"] for s, i in mapped["splits"].items()} == {
        "train": 100000 // 8192, "test": 50000 // 8192, "valid": 16569 // 8192}
    assert verify_dataset(tmp_path / "folds").ok


@pytest.mark.parametrize(("codec", "kind"), [("gzip", "threads"), ("bgzf", "threads"), ("bgzf", "processes")])
def test_worker_count_does_not_change_a_single_byte(tmp_path, monkeypatch, codec, kind):
    """gzip: windows compressed in parallel; BGZF: blocks decompressed in parallel too (small groups)."""
    monkeypatch.setattr(sharding, "BATCH_BASES", 3 * 4096)  # many small batches in flight at once
    fasta = SAMPLE / "hg38_sample.fa.gz"
    if codec == "bgzf":
        fasta = tmp_path / "sample.fa.bgz"
        write_bgzf(fasta, gzip.decompress((SAMPLE / "hg38_sample.fa.gz").read_bytes()), block=5000)
        monkeypatch.setattr(fasta_mod, "BGZF_GROUP_BYTES", 20_000)
    trees = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        shard_genome(sample_config(fasta=str(fasta), out=str(out), window=4096, samples_per_shard=5,
                                   workers=workers, worker_kind=kind, quiet=True))
        trees.append(tree(out))
    assert trees[0] == trees[1] == trees[2] and len(trees[0]) > 10
    assert_round_trip(tmp_path / "w2", plain_fasta(fasta, tmp_path / "plain.fa"))


def test_truncated_bgzf_with_parallel_decompression_keeps_finished_shards(tmp_path):
    fasta = tmp_path / "cut.fa.bgz"
    write_bgzf(fasta, _many_contigs_fasta(tmp_path, 4).read_bytes(), block=8000)
    data = fasta.read_bytes()
    fasta.write_bytes(data[: int(len(data) * 0.6)])
    out = tmp_path / "cut"
    with pytest.raises(FastaError, match=r"truncated or corrupt \(compressed file ended inside a BGZF block\)"):
        shard_genome(ShardConfig(fasta=str(fasta), out=str(out), window=8192, samples_per_shard=4, contigs="all",
                                 workers=2, quiet=True))
    journal = [json.loads(line) for line in (out / STATE_DIR / "journal.jsonl").read_text().splitlines()]
    assert len(journal) >= 12 and all(sha256_file(out / e["tar"]) == e["sha256"] for e in journal)


def test_webdataset_and_tar_read_the_shards(sample_shards):
    import webdataset as wds

    root, manifest = sample_shards
    urls = [str(root / e["tar"]) for e in manifest["splits"]["train"]["shards"]]
    split = ShardSplit(root, "train")
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        tokens = decode_members(sample["bases.2bit"], sample["runs.i32"], meta["length"])
        assert sample["__key__"] == f"train-{meta['id']:09d}" and len(tokens) == 8192
        np.testing.assert_array_equal(tokens, split.read_window(meta["id"]))
        seen.append(meta["id"])
    assert seen == list(range(manifest["splits"]["train"]["windows"]))
    listing = subprocess.run(["tar", "tf", urls[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["train-000000000.json", "train-000000000.bases.2bit", "train-000000000.runs.i32"]
    assert len(listing) == 24


@pytest.mark.parametrize("samples", [1, 3, 21])  # archive ends at, before and across a 10240-byte tar record
def test_worker_packed_shards_equal_the_tarfile_writer(tmp_path, samples):
    """`ShardSink` appends tar members that workers pack into blobs; `ShardWriter` (a stdlib tarfile archive) is the reference."""
    rng = np.random.default_rng(samples)
    split = "fold-\u00e9"  # a non-ASCII split name
    metas = [{"id": k, "split": split, "chrom": "chr1", "start": 10 * k, "end": 10 * k + 7, "n_fraction": k / 7}
             for k in range(samples)]
    payloads = [rng.integers(0, 256, size).astype(np.uint8).tobytes() for size in rng.choice([0, 1, 511, 512, 513, 5000], samples)]
    reference = ShardWriter(tmp_path / "reference.tar")
    for meta, payload in zip(metas, payloads, strict=True):
        reference.add_members(sample_key(split, meta["id"]), meta, (payload, payload[:7]))
    want_index = reference.close()

    sink = ShardSink(tmp_path / "out", samples, tmp_path / "journal.jsonl")
    for first in range(0, samples, 2):  # runs of two samples, as workers would pack them
        members = []
        for meta, payload in zip(metas[first:first + 2], payloads[first:first + 2], strict=True):
            key = sample_key(split, meta["id"])
            members += [(key + ".json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()),
                        (key + ".bases.2bit", payload), (key + ".runs.i32", payload[:7])]
        sink.add(split, first, *pack_members(members))
    entry = sink.written[(split, 0)]
    assert (tmp_path / "out" / entry["tar"]).read_bytes() == (tmp_path / "reference.tar").read_bytes()
    np.testing.assert_array_equal(read_index(tmp_path / "out" / entry["index"]), want_index)
    assert entry["sha256"] == sha256_file(tmp_path / "reference.tar")
    with pytest.raises(ShardingError, match="longer than 100 bytes; use a shorter split name"):
        pack_members([("x" * 101, b"")])


# ------------------------------------------------------------------------------------------ verify

def test_verify_finds_corruption_and_cli_reports_it(sample_shards, capsys):
    root, manifest = sample_shards
    assert cli_main(["--verify", str(root)]) == 0
    assert "OK:" in capsys.readouterr().out
    tar = root / manifest["splits"]["train"]["shards"][1]["tar"]
    data = bytearray(tar.read_bytes())
    data[3000] ^= 0xFF
    tar.write_bytes(bytes(data))
    (root / manifest["splits"]["valid"]["shards"][0]["index"]).unlink()
    report = verify_dataset(root)
    assert not report.ok and len(report.problems) == 2
    assert cli_main(["--verify", str(root)]) == 1
    err = capsys.readouterr().err
    assert "train/shard-000001.tar: size or sha256 differs" in err and "valid/shard-000000.idx is missing" in err


# ------------------------------------------------------------------------------------------ resume

def test_rerun_of_a_finished_directory_reads_nothing(sample_shards, monkeypatch):
    root, manifest = sample_shards
    before = tree(root)

    def no_reading(*_):
        raise AssertionError("the FASTA was read again")

    monkeypatch.setattr(sharding.FastaReader, "stream", no_reading)
    assert shard_genome(sample_config(out=str(root), quiet=True)) == manifest and tree(root) == before


def test_rerun_keeps_finished_shards_and_redoes_damaged_ones(sample_shards):
    root, manifest = sample_shards
    before = tree(root)
    kept = root / "train/shard-000000.tar"
    inode = kept.stat().st_ino, kept.stat().st_mtime_ns
    damaged = root / "train/shard-000002.tar"
    damaged.write_bytes(damaged.read_bytes()[:-700])
    again = shard_genome(sample_config(out=str(root), quiet=True))
    assert again == manifest and tree(root) == before
    assert (kept.stat().st_ino, kept.stat().st_mtime_ns) == inode  # not rewritten


def test_different_arguments_are_refused_unless_overwrite(sample_shards, tmp_path):
    root, _ = sample_shards
    with pytest.raises(ShardingError, match=r"different arguments \(samples_per_shard, window differ\).*--overwrite"):
        shard_genome(sample_config(out=str(root), window=4096, samples_per_shard=5, quiet=True))
    assert verify_dataset(root).ok  # nothing was touched
    shard_genome(sample_config(out=str(root), window=4096, samples_per_shard=5, overwrite=True, quiet=True))
    fresh = tmp_path / "fresh"
    shard_genome(sample_config(out=str(fresh), window=4096, samples_per_shard=5, quiet=True))
    assert tree(root) == tree(fresh)  # no stale shard of the old run survives


def _many_contigs_fasta(tmp_path: Path, copies: int) -> Path:
    text = gzip.decompress((SAMPLE / "hg38_sample.fa.gz").read_bytes()).decode()
    body = text.split(">chrM")[0].split("\n", 1)[1]
    path = tmp_path / "many.fa"
    path.write_text("".join(f">ctg{i}\n{body}" for i in range(copies)))
    return path


def _run_in_child(cfg: ShardConfig, errors, limit: int | None = None) -> None:
    """Target of a forked child: run the sharder, send any error text through the `errors` pipe end."""
    if limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # exceed -> EFBIG, as on a full disk, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        shard_genome(cfg)
    except Exception as exc:
        errors.send(f"{type(exc).__name__}: {exc}")
        os._exit(2)
    os._exit(0)


def test_resume_after_sigkill_is_byte_identical(tmp_path):
    fasta = _many_contigs_fasta(tmp_path, 4)
    cfg = dict(fasta=str(fasta), window=1024, samples_per_shard=3, contigs="all", quiet=True)
    ctx = multiprocessing.get_context("fork")
    killed = tmp_path / "killed"
    child = ctx.Process(target=_run_in_child, args=(ShardConfig(out=str(killed), **cfg), ctx.Pipe()[1]))
    child.start()
    journal = killed / STATE_DIR / "journal.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 20:
                break
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists(), "the run finished before the kill; the test needs a bigger input"
    finished = [json.loads(line) for line in journal.read_text().splitlines()]
    first = killed / finished[0]["tar"]
    stamp = first.stat().st_ino, first.stat().st_mtime_ns
    resumed = shard_genome(ShardConfig(out=str(killed), **cfg))
    clean = tmp_path / "clean"
    assert shard_genome(ShardConfig(out=str(clean), **cfg)) == resumed
    assert tree(killed) == tree(clean)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # finished shards were kept, not redone
    assert not (killed / STATE_DIR).exists()


def test_full_disk_error_is_clear_and_keeps_finished_shards(tmp_path):
    """RLIMIT_FSIZE makes writes past the limit fail with EFBIG, like a full disk, in a real child process."""
    text = gzip.decompress((SAMPLE / "hg38_sample.fa.gz").read_bytes()).decode()
    real = text.split(">chrM")[0].split("\n", 1)[1].replace("\n", "")
    mostly_n = "".join("N" * 8000 + real[i * 192:(i + 1) * 192] for i in range(8))  # short run lists: small shards
    flickering = "".join(pair.lower() if i % 2 else pair for i, pair in enumerate(
        real[j:j + 2] for j in range(0, 16 * 8192, 2)))  # case changes every 2 bases: 4096 runs per window
    fasta = tmp_path / "disk.fa"
    fasta.write_text(f">chrA\n{mostly_n}\n>chrB\n{flickering}\n")
    cfg = dict(fasta=str(fasta), window=8192, samples_per_shard=4, contigs="all", quiet=True)
    out = tmp_path / "full"
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_run_in_child, args=(ShardConfig(out=str(out), **cfg), sender, 25_000))
    child.start()
    child.join(60)
    assert child.exitcode == 2
    message = receiver.recv()
    assert message.startswith("ShardingError: cannot write shards under") and "File too large" in message
    assert "Shards finished so far are kept; rerun with the same arguments to resume" in message
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.partial"))
    journal = [json.loads(line) for line in (out / STATE_DIR / "journal.jsonl").read_text().splitlines()]
    assert [e["tar"] for e in journal] == ["train/shard-000000.tar", "train/shard-000001.tar"]
    assert all(sha256_file(out / e["tar"]) == e["sha256"] for e in journal)
    shard_genome(ShardConfig(out=str(out), **cfg))  # space is back: the rerun completes
    clean = tmp_path / "clean"
    shard_genome(ShardConfig(out=str(clean), **cfg))
    assert tree(out) == tree(clean)


def test_truncated_gzip_keeps_finished_shards_and_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fasta_mod, "CHUNK_BYTES", 1 << 16)
    fasta = _many_contigs_fasta(tmp_path, 4)
    data = gzip.compress(fasta.read_bytes())
    cut = tmp_path / "cut.fa.gz"
    cut.write_bytes(data[: int(len(data) * 0.8)])  # inside the 4th record
    cfg = dict(fasta=str(cut), window=8192, samples_per_shard=4, contigs="all", quiet=True)
    out = tmp_path / "cut"
    with pytest.raises(FastaError, match=f"{cut}: the gzip stream is truncated or corrupt") as err:
        shard_genome(ShardConfig(out=str(out), **cfg))
    failed_record = int(str(err.value).split("while reading record 'ctg")[1].split("'")[0])
    assert failed_record >= 1
    journal = [json.loads(line) for line in (out / STATE_DIR / "journal.jsonl").read_text().splitlines()]
    # Every shard of the records read before the damage is finished and intact (24 windows, 6 shards each),
    # and so may be shards of the damaged record whose windows were all read before the damage.
    names = [e["tar"] for e in journal]
    assert names == [f"train/shard-{i:06d}.tar" for i in range(len(names))]
    assert 6 * failed_record <= len(names) < 6 * (failed_record + 1)
    assert all(sha256_file(out / e["tar"]) == e["sha256"] for e in journal)
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.partial"))


def test_unwritable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ShardingError, match=f"--out {blocker} exists and is not a directory"):
        shard_genome(sample_config(out=str(blocker), quiet=True))
    with pytest.raises(ShardingError, match=r"cannot create the output directory .*Not a directory.*writable --out"):
        shard_genome(sample_config(out=str(blocker / "sub"), quiet=True))
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root to drop privileges")
def test_read_only_output_directory_as_unprivileged_user():
    """Root ignores permissions, so the sharder runs as `nobody` against a directory it may not write."""
    base = Path(tempfile.mkdtemp(prefix="shard-ro-"))
    try:
        base.chmod(0o755)
        out = base / "ro"
        out.mkdir(mode=0o555)
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from caduceus_dist.prep.sharding import *; "
                f"shard_genome(sample_config(out={str(out)!r}, quiet=True))")
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-B", "-c", code],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(base)},
        )
        assert proc.returncode != 0 and "cannot create the output directory" in proc.stderr, proc.stderr
        assert "Permission denied" in proc.stderr and not list(out.iterdir())
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------------------------------------------ splits/contigs

def test_missing_contigs_counted_then_strict_error(tmp_path):
    bed = tmp_path / "rows.bed"
    bed.write_text(f"{CHR22}\t0\t50000\ttrain\nchr7\t0\t50000\ttrain\nchr7\t90\t500\ttest\nchrM\t0\t9000\tvalid\n")
    manifest = shard_genome(sample_config(out=str(tmp_path / "lenient"), bed=str(bed), quiet=True))
    assert manifest["skipped"]["missing_contigs"] == {"chr7": 2}
    with pytest.raises(ShardingError, match=r"1 contig\(s\) named by the splits are not in .*: chr7.*drop --strict"):
        shard_genome(sample_config(out=str(tmp_path / "strict"), bed=str(bed), strict=True, quiet=True))
    assert not (tmp_path / "strict" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------ CLI

def test_cli_errors_exit_2_with_message(tmp_path, capsys):
    bad = tmp_path / "bad.bed"
    bad.write_text(f"{CHR22}\t10\t5\ttrain\n")
    assert cli_main(["--bed", str(bad), "--fasta", str(SAMPLE / "hg38_sample.fa.gz"), "--out", str(tmp_path / "o")]) == 2
    assert f"error: {bad}, line 1: start 10 must be >= 0 and < end 5" in capsys.readouterr().err
    assert cli_main(["--fasta", str(SAMPLE / "hg38_sample.fa.gz")]) == 2
    assert "--out is required" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("shard-*"))


def test_cli_without_arguments_shards_the_sample(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "data_prep" / "shard_genome.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    root = tmp_path / "data" / "shards" / "sample"
    assert "train: 22 windows in 3 shard(s)" in proc.stderr and "\r" not in proc.stderr  # no bar without a TTY
    assert verify_dataset(root).ok
    assert io.StringIO(proc.stdout).read() == ""


@pytest.mark.parametrize("mode", ["tile-bed", "reference-bed", "whole-contigs"])
def test_windows_cut_while_streaming_equal_windows_cut_from_whole_records(tmp_path, monkeypatch, mode):
    """Windows are emitted as soon as their bases arrive; tiny input chunks must not change a byte."""
    fasta = _edited_sample(tmp_path)
    bed = tmp_path / "rows.bed"
    bed.write_text(f"chrM\t0\t16569\tvalid\n{CHR22}\t150000\t200001\ttrain\n{CHR22}\t10000\t190000\ttest\n"
                   f"{CHR22}\t199000\t200001\ttrain\n")
    options = {"tile-bed": dict(bed=str(bed), tiling="tile", window=3000),
               "reference-bed": dict(bed=str(bed), tiling="reference", window=1 << 15),
               "whole-contigs": dict(contigs="all", window=3000)}[mode]
    trees = []
    for chunk in (fasta_mod.CHUNK_BYTES, 4099):
        monkeypatch.setattr(fasta_mod, "CHUNK_BYTES", chunk)
        out = tmp_path / f"chunk{chunk}"
        shard_genome(ShardConfig(fasta=str(fasta), out=str(out), samples_per_shard=7, quiet=True, **options))
        trees.append(tree(out))
    assert trees[0] == trees[1]
    assert_round_trip(tmp_path / "chunk4099", plain_fasta(fasta, tmp_path / "plain.fa"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only_and_quiet_silences_everything(tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert cli_main(["--out", str(tmp_path / "tty")]) == 0
    shown = terminal.getvalue()
    assert "input" in shown and "Mbp/s" in shown and "<" in shown  # tqdm bar: elapsed<ETA, bases/s
    assert "train: 22 windows in 3 shard(s)" in shown
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    assert cli_main(["--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert quiet.getvalue() == ""


def test_empty_split_is_listed_and_no_windows_at_all_is_an_error(tmp_path):
    bed = tmp_path / "rows.bed"
    bed.write_text(f"{CHR22}\t0\t50000\ttrain\nchrM\t0\t5000\ttest\n")  # test: shorter than one window
    manifest = shard_genome(sample_config(out=str(tmp_path / "one"), bed=str(bed), quiet=True))
    assert manifest["splits"]["test"] == {"windows": 0, "bases": 0, "n_bases": 0, "softmasked_bases": 0,
                                          "dropped_windows": 0, "shards": []}
    assert verify_dataset(tmp_path / "one").ok
    with pytest.raises(ShardingError, match=r"no windows were produced .*shorter than --window 300000"):
        shard_genome(sample_config(out=str(tmp_path / "none"), window=300_000, quiet=True))


def _cli_in_child(argv: list[str]) -> None:
    # Ctrl-C as in a terminal: a job a non-interactive shell starts in the background (CI scripts,
    # `cmd &`) inherits SIGINT ignored, and the child would then finish and exit 0.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os._exit(cli_main(argv))


def test_ctrl_c_exits_130_removes_partial_files_and_resumes(tmp_path):
    fasta = _many_contigs_fasta(tmp_path, 3)
    argv = ["--fasta", str(fasta), "--window", "1024", "--samples-per-shard", "3", "--contigs", "all", "--quiet"]
    out = tmp_path / "interrupted"
    child = multiprocessing.get_context("fork").Process(target=_cli_in_child, args=([*argv, "--out", str(out)],))
    child.start()
    journal = out / STATE_DIR / "journal.jsonl"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (journal.exists() and journal.read_text().count("\n") >= 10):
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGINT)
    finally:
        child.join(30)
    assert child.exitcode == 130 and not (out / "manifest.json").exists()
    assert not list(out.rglob("*.partial"))
    assert cli_main([*argv, "--out", str(out)]) == 0
    assert cli_main([*argv, "--out", str(tmp_path / "clean")]) == 0
    assert tree(out) == tree(tmp_path / "clean")


@pytest.mark.parametrize("moment", ["file created, not yet recorded", "index renamed, tar not yet"])
def test_ctrl_c_at_any_moment_of_a_shard_leaves_no_partial_file(tmp_path, monkeypatch, moment):
    """The end-to-end test above lands its Ctrl-C wherever the run happens to be; these two are the
    moments when a shard's files exist but the sink does not (or no longer) list them as open."""
    fasta = _many_contigs_fasta(tmp_path, 3)
    argv = ["--fasta", str(fasta), "--window", "1024", "--samples-per-shard", "3", "--contigs", "all", "--quiet"]
    shards_started = []
    if moment == "file created, not yet recorded":
        original = output_mod._OpenShard.__init__

        def interrupted_open(self, tar, number):
            original(self, tar, number)
            shards_started.append(number)
            if len(shards_started) == 4:
                raise KeyboardInterrupt
        monkeypatch.setattr(output_mod._OpenShard, "__init__", interrupted_open)
    else:
        real_replace = os.replace

        def interrupted_replace(src, dst):
            real_replace(src, dst)
            shards_started.append(dst)
            if len(shards_started) == 7:  # the index of the fourth shard, before its tar
                raise KeyboardInterrupt
        monkeypatch.setattr(output_mod.os, "replace", interrupted_replace)
    out = tmp_path / "interrupted"
    assert cli_main([*argv, "--out", str(out)]) == 130
    assert not list(out.rglob("*.partial"))
    monkeypatch.undo()
    assert cli_main([*argv, "--out", str(out)]) == 0
    assert cli_main([*argv, "--out", str(tmp_path / "clean")]) == 0
    assert tree(out) == tree(tmp_path / "clean")


def test_max_n_fraction_drops_and_counts_windows_with_too_many_n(tmp_path, capsys):
    n_counts = [0, 10, 30, 50, 51, 80, 99, 100, 0, 5]  # per 100-base window, N at the window's start
    rng = np.random.default_rng(0)
    seq = "".join("N" * n + "".join(rng.choice(list("ACGT"), 100 - n)) for n in n_counts)
    fasta = tmp_path / "g.fa"
    fasta.write_text(f">chr1\n{seq}\n")
    base = ["--fasta", str(fasta), "--window", "100", "--contigs", "all"]
    for fraction, kept in ((None, [n for n in n_counts if n < 100]), ("0.5", [n for n in n_counts if n <= 50])):
        out = tmp_path / f"out{fraction}"
        assert cli_main([*base, "--out", str(out), *(["--max-n-fraction", fraction] if fraction else [])]) == 0
        train = load_manifest(out)["splits"]["train"]
        assert (train["windows"], train["n_bases"], train["dropped_windows"]) == (len(kept), sum(kept),
                                                                                  len(n_counts) - len(kept))
        assert verify_dataset(out).ok
        summary_line = capsys.readouterr().err
        assert f"{len(n_counts) - len(kept)} windows dropped for N" in summary_line
    assert cli_main([*base, "--out", str(tmp_path / "bad"), "--max-n-fraction", "1.0"]) == 2
    assert "--max-n-fraction must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_a_run_that_wrote_no_shard_does_not_block_other_arguments(tmp_path):
    chrm_only = tmp_path / "mt.fa"
    chrm_only.write_text(">MT_human\n" + "ACGT" * 5000 + "\n")
    out = tmp_path / "out"
    with pytest.raises(ShardingError, match=r"1 contig\(s\) were left out by --contigs primary \(e.g. 'MT_human'"):
        shard_genome(ShardConfig(fasta=str(chrm_only), out=str(out), window=4096, quiet=True))
    manifest = shard_genome(ShardConfig(fasta=str(chrm_only), out=str(out), window=2048, contigs="all", quiet=True))
    assert manifest["splits"]["train"]["windows"] == 20_000 // 2048


def test_holdout_contigs_puts_whole_contigs_in_valid_and_test_by_a_seeded_draw(tmp_path):
    """`--holdout contigs`: each of 60 contigs goes to one split as a whole, drawn by a hash of (seed, contig):
    counts within 5 sigma of the fractions, the same contigs again with the same seed, others with another."""
    text = gzip.decompress((SAMPLE / "hg38_sample.fa.gz").read_bytes()).decode()
    real = text.split(">chrM")[0].split("\n", 1)[1].replace("\n", "")
    fasta = tmp_path / "many.fa"
    fasta.write_text("".join(f">contig{i}\n{real[i * 3000:i * 3000 + 2048]}\n" for i in range(60)))

    def contigs_by_split(seed: int, run: str = "") -> dict[str, set[str]]:
        out = tmp_path / f"seed{seed}{run}"
        manifest = shard_genome(ShardConfig(fasta=str(fasta), out=str(out), window=512, contigs="all", quiet=True,
                                            valid_fraction=0.2, test_fraction=0.2, holdout="contigs", split_seed=seed))
        found: dict[str, set[str]] = {}
        for split, info in manifest["splits"].items():
            for entry in info["shards"]:
                reader = ShardReader(out / entry["tar"], out / entry["index"], manifest["format_version"])
                found.setdefault(split, set()).update(reader.read_meta(k)["chrom"] for k in range(len(reader)))
        return found

    first = contigs_by_split(0)
    assert set().union(*first.values()) == {f"contig{i}" for i in range(60)}
    assert sum(map(len, first.values())) == 60  # a contig is never split between splits
    for split in ("valid", "test"):
        assert abs(len(first[split]) - 12) <= 5 * (60 * 0.2 * 0.8) ** 0.5
    assert contigs_by_split(0, "again") == first and contigs_by_split(1) != first
