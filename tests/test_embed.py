"""`python -m caduceus_dist.embed`: batching and scan chunking leave the embeddings unchanged, strands are
conjoined (a region and its reverse complement embed alike), and bad input fails in one line."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from caduceus_dist.embed import main, read_embeddings
from caduceus_dist.model import CaduceusForMaskedLM
from caduceus_dist.model.tokenizer import CaduceusTokenizer

RC = str.maketrans("ACGTacgt", "TGCAtgca")


@pytest.fixture(scope="module")
def genome(tmp_path_factory):
    """Two contigs of random DNA (soft-masked stretch, some N), and the first one's reverse complement."""
    rng = np.random.default_rng(1)
    first = "".join(rng.choice(list("ACGT"), 3000))
    first = first[:500] + first[500:900].lower() + "N" * 20 + first[920:]
    second = "".join(rng.choice(list("ACGT"), 1500))
    path = tmp_path_factory.mktemp("genome") / "genome.fa"
    path.write_text(f">chr1\n{first}\n>chr2\n{second}\n>chr1_rc\n{first.translate(RC)[::-1]}\n")
    return path


def run(tiny_export, fasta, out, *extra):
    assert main(["--checkpoint", str(tiny_export), "--fasta", str(fasta), "--out", str(out), "--quiet", *extra]) == 0
    return read_embeddings(out)


def test_batching_and_scan_chunks_do_not_change_embeddings(tiny_export, genome, tmp_path):
    bed = tmp_path / "regions.bed"
    rows = [("1", 0, 1000, "a"), ("chr1", 1000, 2000, "b"), ("chr1", 2000, 3000, "c"), ("chr2", 0, 1000, "d"),
            ("chr2", 200, 700, "e")]  # "1" finds chr1: names match with or without "chr"
    bed.write_text("".join(f"{c}\t{s}\t{e}\t{n}\n" for c, s, e, n in rows))
    one_by_one = run(tiny_export, genome, tmp_path / "single", "--bed", str(bed), "--max-tokens", "1")
    batched = run(tiny_export, genome, tmp_path / "batched", "--bed", str(bed), "--max-tokens", "100000",
                  "--scan-chunk-size", "64")
    assert list(one_by_one) == ["a", "b", "c", "d", "e"]  # index in BED order
    bed.write_text("".join(f"{c}\t{s}\t{e}\ttrain\n" for c, s, e, _ in rows))  # repeated labels name nothing
    by_place = run(tiny_export, genome, tmp_path / "labels", "--bed", str(bed))
    assert list(by_place) == [f"{c}:{s}-{e}" for c, s, e, _ in rows]
    for name in one_by_one:
        assert one_by_one[name].shape == (32,)
        np.testing.assert_allclose(batched[name], one_by_one[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(one_by_one["a"], one_by_one["b"], atol=1e-3)  # different regions really differ


def test_pooled_and_per_position_embeddings_are_strand_symmetric(tiny_export, genome, tmp_path):
    pooled = run(tiny_export, genome, tmp_path / "pooled")
    np.testing.assert_allclose(pooled["chr1"], pooled["chr1_rc"], rtol=1e-5, atol=1e-6)
    per_position = run(tiny_export, genome, tmp_path / "positions", "--per-position")
    assert per_position["chr1"].shape == (3000, 32)
    np.testing.assert_allclose(per_position["chr1"], per_position["chr1_rc"][::-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(per_position["chr1"].mean(0), pooled["chr1"], rtol=1e-4, atol=1e-6)
    raw = run(tiny_export, genome, tmp_path / "raw", "--no-conjoin")  # one strand: not symmetric
    assert not np.allclose(raw["chr1"], raw["chr1_rc"], atol=1e-4)
    bf16 = run(tiny_export, genome, tmp_path / "bf16", "--dtype", "bf16")  # bf16 compute: close, not equal
    scale = np.abs(pooled["chr1"]).max()
    assert 0 < np.abs(bf16["chr1"] - pooled["chr1"]).max() < 0.05 * scale


def test_pooled_embedding_is_the_mean_of_the_conjoined_hidden_states(tiny_export, genome, tmp_path):
    """Against a direct computation: forward pass on both strands, written out here without the package's helper."""
    model = CaduceusForMaskedLM.from_pretrained(tiny_export).eval()
    text = genome.read_text().split("\n")[3]
    ids = torch.from_numpy(CaduceusTokenizer().encode(text).astype(np.int64))[None]
    with torch.no_grad():
        hidden = model.caduceus(ids)
        if model.config.rcps:
            d = model.config.d_model
            expected = (hidden[..., :d] + hidden[..., d:].flip(-1)).mean(1) / 2
        else:
            rc_ids = torch.from_numpy(CaduceusTokenizer.reverse_complement(ids.numpy()).astype(np.int64).copy())
            expected = (hidden.mean(1) + model.caduceus(rc_ids).mean(1)) / 2
    got = run(tiny_export, genome, tmp_path / "out")["chr2"]
    np.testing.assert_allclose(got, expected[0].numpy(), rtol=1e-5, atol=1e-6)


def test_bad_input_fails_in_one_line_and_keeps_the_previous_output(tiny_export, genome, tmp_path, capsys):
    out = tmp_path / "out"
    run(tiny_export, genome, out)
    before = (out / "index.tsv").read_text()
    base = ["--checkpoint", str(tiny_export), "--fasta", str(genome), "--quiet"]
    bed = tmp_path / "bad.bed"
    cases = [
        ("chrX\t0\t100\n", r"bad\.bed, line 1: contig 'chrX' is not in the FASTA"),
        ("chr2\t0\t100\nchr2\t1000\t2000\n", r"region chr2:1000-2000 \(chr2:1000-2000\) ends past the contig's length 1500"),
        ("chr2\t100\t50\n", r"line 1: start 100 must be >= 0 and < end 50"),
    ]
    for text, message in cases:
        bed.write_text(text)
        assert main([*base, "--bed", str(bed), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(message, err), err
        assert (out / "index.tsv").read_text() == before and not (tmp_path / "out.partial").exists()
    assert main([*base, "--out", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "x"), "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
