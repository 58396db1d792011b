"""Genome collections (`shard_genome.py --collection`): the embedded three-species sample, parallel and serial,
against single-genome runs; counts against an independent reading of the FASTAs; one-line errors."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caduceus_dist.prep.cli import main as cli_main
from caduceus_dist.prep.collection import SAMPLE_COLLECTION, load_collection, shard_collection
from caduceus_dist.prep.sharding import shard_genome
from caduceus_dist.prep.verify import verify_dataset

REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and ".shard_genome" not in p.parts and p.name != "collection.json"}


def test_collection_equals_single_genome_runs_and_counts_the_fasta(tmp_path):
    """Three genomes in parallel processes: each directory is byte-identical to its own single-genome run and
    verifies; the collection manifest's per-split totals match those manifests; stored + held-out windows hold
    the FASTA's soft-masked bases, counted here from the FASTA text."""
    parallel = shard_collection(SAMPLE_COLLECTION, tmp_path / "parallel", workers=3, report=lambda _line: None)
    assert [g["name"] for g in parallel["genomes"]] == ["human", "fly", "yeast"]
    for genome in load_collection(SAMPLE_COLLECTION, tmp_path / "single"):
        shard_genome(genome.config)
        assert tree(tmp_path / "parallel" / genome.name) == tree(tmp_path / "single" / genome.name)
        assert verify_dataset(tmp_path / "parallel" / genome.name).ok
    for entry in parallel["genomes"]:
        manifest = json.loads((tmp_path / "parallel" / entry["name"] / "manifest.json").read_text())
        assert entry["splits"] == {split: {k: info[k] for k in ("windows", "bases", "n_bases", "softmasked_bases")}
                                   for split, info in manifest["splits"].items()}
        text = gzip.decompress((SAMPLE_COLLECTION.parent / genome_fasta(entry["name"])).read_bytes()).decode()
        sequence = "".join(text.split("\n", 1)[1].split())
        window = manifest["window"]
        stored = sum(info["windows"] for info in manifest["splits"].values())
        assert stored == len(sequence) // window  # tile: every whole window, none all N
        lower = sum(c.islower() for c in sequence[:stored * window])
        assert sum(info["softmasked_bases"] for info in manifest["splits"].values()) == lower
    assert {g["name"]: g["taxon"] for g in parallel["genomes"]} == {"human": 9606, "fly": 7227, "yeast": 559292}
    assert parallel["genomes"][0]["splits"]["train"]["softmasked_bases"] > 0


def genome_fasta(name: str) -> str:
    return {"human": "mix_human_hg38_chr16.fa.gz", "fly": "mix_fly_dm3_chr2R.fa.gz",
            "yeast": "mix_yeast_S288C_chrI.fa.gz"}[name]


@pytest.mark.parametrize(("text", "message"), [
    ("genomes: []", "expected a mapping with a non-empty list 'genomes:'"),
    ("windw: 8192\ngenomes: [{name: a, fasta: a.fa}]", r"top level: unknown key\(s\) \['windw'\]"),
    ("genomes: [{name: a, fasta: a.fa, colour: red}]", r"genomes\[0\] \(a\): unknown key\(s\) \['colour'\]"),
    ("genomes: [{name: a}]", r"genomes\[0\] \(a\): 'fasta' is missing"),
    ("genomes: [{name: a, fasta: x.fa}, {name: a, fasta: y.fa}]", r"genomes\[1\] \(a\): name 'a' is used twice"),
    ("genomes: [{name: a/b, fasta: x.fa}]", r"'name' must be a directory name"),
    ("genomes: [{name: a, fasta: [x", "is not valid YAML"),
    ("genomes: [{name: a, fasta: missing.fa}]", r"genome 'a': .*missing\.fa"),
])
def test_bad_collections_are_one_line_errors_naming_file_and_genome(tmp_path, capsys, text, message):
    path = tmp_path / "genomes.yaml"
    path.write_text(text)
    assert cli_main(["--collection", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("shard_genome.py: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "collection.json").exists()


def test_collection_cli_refuses_single_genome_options_and_reruns_without_work(tmp_path):
    out = tmp_path / "mix"
    command = [sys.executable, str(REPO / "data_prep" / "shard_genome.py"), "--collection", str(SAMPLE_COLLECTION),
               "--out", str(out), "--workers", "2"]
    first = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "human: train" in first.stderr and "wrote" in first.stderr
    before = tree(out)
    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0 and tree(out) == before
    refused = subprocess.run([*command, "--window", "4096"], capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and "--collection takes its genomes' settings from the YAML file; drop --window" \
        in refused.stderr


def test_ctrl_c_stops_every_genome_keeps_finished_shards_and_the_rerun_completes(tmp_path):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does) while the genomes shard in parallel
    processes, each slowed down so the signal lands mid-run: exit 130, no partial file anywhere, and a rerun
    of the same command gives the same bytes as an uninterrupted run."""
    slowed = ("import sys, time\n"
              "from caduceus_dist.prep import sharding\n"
              "from caduceus_dist.prep.cli import main\n"
              "pack = sharding.pack_run\n"
              "sharding.pack_run = lambda *args: (time.sleep(2.0), pack(*args))[1]\n"
              "sys.exit(main(sys.argv[1:]))\n")
    args = ["--collection", str(SAMPLE_COLLECTION), "--out", str(tmp_path / "out"), "--workers", "3", "--quiet"]
    child = subprocess.Popen([sys.executable, "-c", slowed, *args], cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = [tmp_path / "out" / name / ".shard_genome" for name in ("human", "fly", "yeast")]
    deadline = time.monotonic() + 60
    while not all(p.exists() for p in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # every genome is inside its one run of windows (2 s of packing each)
    os.killpg(child.pid, signal.SIGINT)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert "interrupted; finished shards are kept" in err
    assert not list((tmp_path / "out").rglob("*.partial")) and not (tmp_path / "out" / "collection.json").exists()
    assert subprocess.run([sys.executable, "-c", slowed, *args], cwd=tmp_path).returncode == 0
    shard_collection(SAMPLE_COLLECTION, tmp_path / "clean", report=lambda _line: None)
    for name in ("human", "fly", "yeast"):
        assert tree(tmp_path / "out" / name) == tree(tmp_path / "clean" / name)
