"""Sharder on the real genomes of ../shared/data: hg38 coordinates with the Borzoi fold BED, GRCh37 chr20."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from test_prep_pipeline import assert_round_trip, tree

from caduceus_dist.data.dataset import ShardSplit
from caduceus_dist.prep.collection import shard_collection
from caduceus_dist.prep.sharding import ShardConfig, shard_genome
from caduceus_dist.prep.tiling import REFERENCE_SPAN
from caduceus_dist.prep.verify import verify_dataset
from caduceus_dist.shard_format import ShardReader

pytestmark = pytest.mark.shared_data

SLICE_START, SLICE_LENGTH = 16_599_999, 200_001  # hg38 chr22:16,600,000-16,800,000 (1-based, inclusive)


def hg38_chr22_with_real_slice(shared: Path, dest: Path) -> tuple[Path, int]:
    """hg38 chr22 at its real length (hg38.chrom.sizes), N everywhere except the real slice: real coordinates."""
    sizes = dict(line.split("\t") for line in (shared / "hg38.chrom.sizes").read_text().splitlines())
    length = int(sizes["chr22"])
    lines = (shared / "hg38_chr22_16.6M-16.8M.fa").read_text().splitlines()
    assert lines[0] == ">chr22:16600000-16800000"
    real = "".join(lines[1:])
    assert len(real) == SLICE_LENGTH
    sequence = "N" * SLICE_START + real + "N" * (length - SLICE_START - SLICE_LENGTH)
    dest.write_text(">chr22\n" + "".join(sequence[i:i + 80] + "\n" for i in range(0, len(sequence), 80)))
    return dest, length


def test_borzoi_fold_bed_reference_tiling_on_hg38_coordinates(shared_data, tmp_path):
    fasta, length = hg38_chr22_with_real_slice(shared_data, tmp_path / "chr22.fa")
    bed = shared_data / "borzoi_sequences_human.bed.gz"
    window = 1 << 17
    out = tmp_path / "borzoi"
    manifest = shard_genome(ShardConfig(fasta=str(fasta), bed=str(bed), split_map="fold3=test,fold4=valid,*=train",
                                        out=str(out), window=window, samples_per_shard=16, quiet=True, workers=2))
    assert manifest["tiling"] == "reference"
    # Independent count: the FASTA is N except the real slice, so a window is stored iff it overlaps the
    # slice, and its N bases are the ones outside it. Rows on other chromosomes are missing contigs.
    mapping = {"fold3": "test", "fold4": "valid"}
    want: dict[str, dict] = {}
    rows_elsewhere: dict[str, int] = {}
    with gzip.open(bed, "rt") as fh:
        rows = [line.split("\t")[:4] for line in fh]
    for chrom, start, _, fold in rows:
        split = mapping.get(fold.strip(), "train")
        c = want.setdefault(split, {"windows": 0, "bases": 0, "n_bases": 0, "dropped_windows": 0})
        if chrom != "chr22":
            rows_elsewhere[chrom] = rows_elsewhere.get(chrom, 0) + 1
            continue
        for shift in range(REFERENCE_SPAN // window):
            s = int(start) + shift * window
            s = min(s, length - window)
            overlap = max(0, min(s + window, SLICE_START + SLICE_LENGTH) - max(s, SLICE_START))
            if overlap == 0:
                c["dropped_windows"] += 1
            else:
                c["windows"] += 1
                c["bases"] += window
                c["n_bases"] += window - overlap
    got = {s: {k: i[k] for k in ("windows", "bases", "n_bases", "dropped_windows")} for s, i in manifest["splits"].items()}
    assert got == want and want["valid"]["windows"] > 0
    assert manifest["skipped"]["missing_contigs"] == rows_elsewhere and len(rows_elsewhere) == 22
    assert assert_round_trip(out, fasta) == sum(c["windows"] for c in want.values())
    assert verify_dataset(out).ok


@pytest.mark.slow
def test_grch37_chr20_whole_chromosome_bgzf(shared_data, tmp_path):
    """The whole 63 Mbp chromosome: BGZF input, window-range parallelism inside one record, round trip."""
    plain = tmp_path / "chr20.fa"
    plain.write_bytes(gzip.decompress((shared_data / "grch37_chr20.fa.gz").read_bytes()))
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        manifest = shard_genome(ShardConfig(fasta=str(shared_data / "grch37_chr20.fa.gz"), out=str(outs[workers]),
                                            window=1 << 17, workers=workers, samples_per_shard=64, quiet=True))
    assert tree(outs[1]) == tree(outs[2])
    train = manifest["splits"]["train"]
    assert train["windows"] + train["dropped_windows"] == 63_025_520 // (1 << 17)
    assert manifest["fasta"]["bases"] == 63_025_520 and len(train["shards"]) == -(-train["windows"] // 64)
    assert assert_round_trip(outs[2], plain) == train["windows"]


@pytest.mark.parametrize("genome", ["Hsap_hg38_chr16_186964-397118.softmasked.fa.gz",
                                    "Dmel_dm3_chr2R_2M-7M.softmasked.fa.gz"])
def test_soft_masking_survives_sharding_base_for_base(shared_data, tmp_path, genome):
    """UCSC soft-masked genomes: every stored base keeps its case, softmasked_bases counts them."""
    fasta = tmp_path / "genome.fa"
    fasta.write_bytes(gzip.decompress((shared_data / "genomes" / "small" / genome).read_bytes()))
    out = tmp_path / "shards"
    manifest = shard_genome(ShardConfig(fasta=str(fasta), out=str(out), window=1 << 14, contigs="all",
                                        valid_fraction=0.1, quiet=True))
    assert assert_round_trip(out, fasta) == sum(info["windows"] for info in manifest["splits"].values()) > 0
    stored_lower = sum(info["softmasked_bases"] for info in manifest["splits"].values())
    text = "".join(line for line in fasta.read_text().splitlines() if not line.startswith(">"))
    lower = sum(text.count(c) for c in "acgtn")
    assert 0.2 * lower < stored_lower <= lower  # the windows leave out each contig's tail only
    assert verify_dataset(out).ok


def test_collection_of_real_genomes_with_each_split_rule(shared_data, tmp_path):
    """Three real genomes of ../shared/data/genomes/more, one split rule each: fly chr2R (soft-masked by UCSC)
    with a held-out fraction of windows, U. maydis (36 records) with a held-out fraction of whole contigs,
    E. coli K-12 with nothing held out. The fungus's valid split is whole contigs; the fly's soft-masked base
    count is the FASTA's lower case in its stored windows."""
    more = shared_data / "genomes" / "more"
    collection = tmp_path / "genomes.yaml"
    collection.write_text(
        "window: 65536\ncontigs: all\ngenomes:\n"
        f"  - {{name: fly, fasta: {more / 'Dmel_dm3_chr2R.softmasked.fa.gz'}, taxon: 7227, valid_fraction: 0.05}}\n"
        f"  - {{name: fungus, fasta: {more / 'Umay_521_genome.fa.gz'}, valid_fraction: 0.2, holdout: contigs,"
        " split_seed: 3}\n"
        f"  - {{name: ecoli, fasta: {more / 'Ecol_K12_MG1655.fa.gz'}}}\n")
    result = shard_collection(collection, tmp_path / "out", workers=2, report=lambda _line: None)
    splits = {g["name"]: g["splits"] for g in result["genomes"]}
    assert set(splits["ecoli"]) == {"train"} and splits["ecoli"]["train"]["windows"] == 4_639_675 // 65536
    for name in ("fly", "fungus", "ecoli"):
        assert verify_dataset(tmp_path / "out" / name).ok
    def contigs(split: str) -> set[str]:
        shards = ShardSplit(tmp_path / "out" / "fungus", split)
        found = set()
        for entry in shards.shards:
            reader = ShardReader(entry.tar, entry.index, shards.version)
            found.update(reader.read_meta(k)["chrom"] for k in range(entry.samples))
        return found

    held, kept = contigs("valid"), contigs("train")
    assert held and kept and not held & kept  # whole contigs on one side only
    text = gzip.decompress((more / "Dmel_dm3_chr2R.softmasked.fa.gz").read_bytes()).decode()
    sequence = "".join(text.split("\n", 1)[1].split())
    stored = sum(info["windows"] for info in splits["fly"].values())
    assert stored == len(sequence) // 65536
    lower = sum(1 for c in sequence[:stored * 65536] if c.islower())
    assert sum(info["softmasked_bases"] for info in splits["fly"].values()) == lower > 0
