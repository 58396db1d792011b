"""`python -m caduceus_dist.score_variants`: masked-marginal scores equal a direct computation written
here with string operations, PS strands agree to fp32 rounding, shared windows change nothing, every
input allele gets a row, and unusable rows are reported (or fatal with --strict) in one line."""

from __future__ import annotations

import csv
import gzip
import re

import numpy as np
import pytest
import torch
from conftest import SAMPLE_DIR

from caduceus_dist.inference import pick_device
from caduceus_dist.model import CaduceusForMaskedLM
from caduceus_dist.model.tokenizer import CaduceusTokenizer
from caduceus_dist.score_variants import main, read_vcf, score_variants

SAMPLE = SAMPLE_DIR
RC = str.maketrans("ACGT", "TGCA")
WINDOW = 256


@pytest.fixture(scope="module")
def sample_sequence() -> str:
    with gzip.open(SAMPLE / "grch37_chr20_sample.fa.gz", "rt") as fh:
        return "".join(fh.read().split("\n")[1:])


def rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def score(tiny_export, vcf, out, *extra, fasta=SAMPLE / "grch37_chr20_sample.fa.gz"):
    argv = ["--checkpoint", str(tiny_export), "--fasta", str(fasta), "--vcf", str(vcf), "--out", str(out),
            "--window", str(WINDOW), "--quiet", *extra]
    return main(argv)


def masked_log_probs(model, text: str, masked: range) -> torch.Tensor:
    ids = torch.from_numpy(CaduceusTokenizer().encode(text).astype(np.int64))[None].clone()
    ids[0, list(masked)] = 3  # [MASK]
    with torch.no_grad():
        return torch.log_softmax(model(ids)[0], dim=-1)[list(masked)]


def direct_score(model, seq: str, pos: int, ref: str, alt: str, strand: str) -> float:
    """Written from the definition: trim, mask the differing bases in a window of each haplotype, sum log p."""
    prefix = 0
    while prefix < min(len(ref), len(alt)) and ref[prefix] == alt[prefix]:
        prefix += 1
    ref_part, alt_part = ref[prefix:], alt[prefix:]  # the test variants share no suffix
    start = pos - 1 + prefix
    ws = max(0, min(start + len(ref_part) // 2 - WINDOW // 2, len(seq) - WINDOW))
    total = 0.0
    for sign, hap, part in ((-1, seq[ws:ws + WINDOW], ref_part),
                            (1, (seq[ws:start] + alt_part + seq[start + len(ref_part):])[:WINDOW], alt_part)):
        if not part:
            continue
        offset = start - ws
        if strand == "reverse":
            hap, part, offset = hap.translate(RC)[::-1], part.translate(RC)[::-1], len(hap) - offset - len(part)
        log_probs = masked_log_probs(model, hap, range(offset, offset + len(part)))
        total += sign * sum(log_probs[i, 7 + "ACGT".index(b)].item() for i, b in enumerate(part))
    return total


def test_scores_equal_a_direct_computation_on_both_strands(tiny_export, sample_sequence, tmp_path):
    assert score(tiny_export, SAMPLE / "grch37_chr20_sample.vcf", tmp_path / "out.tsv", "--strands", "both") == 0
    got = rows(tmp_path / "out.tsv")
    variants = read_vcf(SAMPLE / "grch37_chr20_sample.vcf")
    assert [(r["pos"], r["alt"]) for r in got] == [(str(v.pos), v.alt) for v in variants]  # every allele, in order
    assert len(got) == 13 and all(r["status"] == "scored" for r in got)
    assert {r["kind"] for r in got} == {"snv", "insertion", "deletion"}
    model = CaduceusForMaskedLM.from_pretrained(tiny_export).eval()
    for row in got:
        for strand in ("forward", "reverse"):
            expected = direct_score(model, sample_sequence, int(row["pos"]), row["ref"], row["alt"], strand)
            assert float(row[f"score_{strand}"]) == pytest.approx(expected, rel=1e-4, abs=1e-4), (row, strand)
        assert float(row["score"]) == pytest.approx((float(row["score_forward"]) + float(row["score_reverse"])) / 2,
                                                    rel=1e-5, abs=1e-5)
    if model.config.rcps:  # PS: exactly strand-symmetric, so one pass suffices
        for row in got:
            assert float(row["score_forward"]) == pytest.approx(float(row["score_reverse"]), rel=1e-5, abs=1e-5)


def test_shared_windows_and_batches_give_the_same_scores(tiny_export):
    model = CaduceusForMaskedLM.from_pretrained(tiny_export).eval()
    fasta, device = SAMPLE / "grch37_chr20_sample.fa.gz", pick_device("cpu")
    results = []
    for share, max_tokens in ((True, 1 << 16), (False, WINDOW)):  # batched + shared vs one window per pass
        variants = read_vcf(SAMPLE / "grch37_chr20_sample.vcf")
        score_variants(model, fasta, variants, WINDOW, ["forward"], max_tokens, device, strict=False, share=share)
        results.append([v.score for v in variants])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-5)


def test_unusable_rows_are_reported_or_fatal_with_strict(tiny_export, tmp_path, capsys):
    vcf = tmp_path / "mixed.vcf.gz"
    with gzip.open(vcf, "wt") as fh:
        fh.write("##fileformat=VCFv4.2\n#CHROM\tPOS\tID\tREF\tALT\n"
                 "chr20:42400001-42600000\t20000\ta\tT\tG\n"  # "chr" added: still found
                 "20:42400001-42600000\t20000\tb\tC\tG\n"  # REF does not match (the base is T)
                 "X\t5\tc\tA\tG\n"
                 "20:42400001-42600000\t20001\td\tA\t<DEL>\n"
                 "20:42400001-42600000\t199999\te\tTTTT\tT\n")  # runs past the end of the record
    assert score(tiny_export, vcf, tmp_path / "out.tsv") == 0
    status = {r["id"]: r["status"] for r in rows(tmp_path / "out.tsv")}
    assert status["a"] == "scored"
    assert status["b"] == "skipped: REF 'C' does not match the FASTA ('T' at 20:42400001-42600000:20000)"
    assert status["c"] == "skipped: contig 'X' is not in the FASTA (also tried with and without 'chr')"
    assert status["d"] == "skipped: ALT '<DEL>' is symbolic or not a DNA allele"
    assert status["e"].startswith("skipped: REF ends at 200002, past the end of 20:42400001-42600000")
    (tmp_path / "strict.tsv").write_text("earlier output\n")
    assert score(tiny_export, vcf, tmp_path / "strict.tsv", "--strict") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(r"VCF line 5 \(X:5 A>G\): contig 'X' is not in the FASTA .* drop --strict", err), err
    assert (tmp_path / "strict.tsv").read_text() == "earlier output\n"  # nothing half-written


@pytest.mark.shared_data
@pytest.mark.slow
def test_real_chr20_indels_and_every_snv_allele_at_their_positions(tiny_export, shared_data, tmp_path):
    """194 real indels on the whole GRCh37 chr20, plus all three SNV alleles at each of their positions."""
    vcf = tmp_path / "snvs_and_indels.vcf"
    with gzip.open(shared_data / "variants" / "grch37_chr20_indels.vcf.gz", "rt") as fh:
        lines = [line for line in fh if not line.startswith("#")]
    snvs = []
    for line in lines:
        chrom, pos, _, ref, *_ = line.split("\t")
        base = ref[0]
        snvs.append(f"{chrom}\t{pos}\tsnv\t{base}\t{','.join(b for b in 'ACGT' if b != base)}\n")
    vcf.write_text("#CHROM\tPOS\tID\tREF\tALT\n" + "".join(lines) + "".join(snvs))
    assert score(tiny_export, vcf, tmp_path / "out.tsv", fasta=shared_data / "grch37_chr20.fa.gz") == 0
    got = rows(tmp_path / "out.tsv")
    assert len(got) == 194 + 3 * 194 and all(r["status"] == "scored" for r in got)
    kinds = {k: sum(r["kind"] == k for r in got) for k in ("snv", "insertion", "deletion")}
    assert kinds == {"snv": 582, "insertion": 89, "deletion": 105}
    assert all(np.isfinite(float(r["score"])) for r in got)
