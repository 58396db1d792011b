"""Mixtures of genomes: the sharder on a collection, the loader on a 3-source mixture, batch diversity at scale.

    .venv/bin/python benchmarks/bench_mixture.py [--seconds 4] [--lengths 1024,131072]

1. Sharder. Three genomes of ../shared/data/genomes/more (human GRCh37 chr20 soft-masked by windowmasker,
   fly dm3 chr2R, U. maydis; 104 Mbp) as one collection (`shard_genome.py --collection`, 2 genomes at a
   time on this 2-core machine) against the single-genome figure: the same genomes sharded one after
   the other, one worker each. Mbp/s of both and the ratio.
2. Loader. Tokens per CPU second of one worker (the batch builder a DataLoader worker runs) on a 3-source
   mixture of those shards (weights 0.5 / 0.3 / 0.2) against today's single-source loader on chr20 alone,
   in the same run, at each length; the ratio; the worker's memory (its buffers, stated by formula).
3. Diversity. `python -m caduceus_dist.data.plan --stats` for recipes/ps_1k.yaml and ps_131k.yaml (and
   ps_131k with a 1k -> 131k curriculum, 200 steps a stage) on hg38's 272k windows of 131,072 bases
   (`--windows`, no shards needed): distinct windows per step and next-step reuse, ours against
   independent draws. Reuse is rare (0.4% of 1024 windows, ~4 per step pair), so a stage needs ~200 steps
   for its reuse ratio to settle within the 1.5 target's noise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from bench_loader import one_worker, timed

from caduceus_dist.data import DataConfig, TrainStream
from caduceus_dist.data.config import SourceConfig
from caduceus_dist.data.plan import diversity_stats, load_recipe
from caduceus_dist.prep.collection import load_collection, shard_collection
from caduceus_dist.prep.sharding import shard_genome

REPO = Path(__file__).resolve().parents[1]
MORE = REPO.parent / "shared" / "data" / "genomes" / "more"
GENOMES = {"human": "Hsap_GRCh37_chr20.windowmasker.softmasked.fa.gz", "fly": "Dmel_dm3_chr2R.softmasked.fa.gz",
           "fungus": "Umay_521_genome.fa.gz"}
WEIGHTS = {"human": 0.5, "fly": 0.3, "fungus": 0.2}
STEP_TOKENS = 1 << 20


def write_collection(path: Path) -> Path:
    lines = ["window: 131072", "contigs: all", "valid_fraction: 0.05", "genomes:"]
    lines += [f"  - {{name: {name}, fasta: {MORE / fasta}}}" for name, fasta in GENOMES.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def bench_sharder(collection: Path, work: Path) -> dict:
    """Collection (2 genomes at a time) vs the same genomes one after the other, one worker each; fresh outputs."""
    for old in ("single", "collection"):
        shutil.rmtree(work / old, ignore_errors=True)
    bases = 0
    start = time.perf_counter()
    for genome in load_collection(collection, work / "single"):
        manifest = shard_genome(genome.config)
        bases += manifest["fasta"]["bases"]
    single = time.perf_counter() - start
    start = time.perf_counter()
    shard_collection(collection, work / "collection", workers=2, report=lambda _line: None)
    together = time.perf_counter() - start
    return {"bases": bases, "single_s": single, "collection_s": together, "single_mbps": bases / single / 1e6,
            "collection_mbps": bases / together / 1e6, "ratio": single / together}


def bench_loader(shards: Path, lengths: list[int], seconds: float) -> list[dict]:
    out = []
    for length in lengths:
        common = dict(seq_len=length, tokens_per_step=STEP_TOKENS, rc_probability=0.5, num_workers=0, verify="size", seed=1)
        single = DataConfig(shards=str(shards / "human"), **common)
        mixture = DataConfig(sources=[SourceConfig(name, str(shards / name), WEIGHTS[name]) for name in GENOMES], **common)
        _, single_cpu = timed(one_worker(single, None), seconds)
        _, mixture_cpu = timed(one_worker(mixture, None), seconds)
        rows = STEP_TOKENS // length
        out.append({"seq_len": length, "single_tokens_per_cpu_s": single_cpu, "mixture_tokens_per_cpu_s": mixture_cpu,
                    "ratio": mixture_cpu / single_cpu, "worker_buffer_mib": 5 * rows * length / 2**20})
    return out


def bench_diversity() -> list[dict]:
    cases = {"ps_1k": ("ps_1k.yaml", [], 200), "ps_131k": ("ps_131k.yaml", [], 200),
             "ps_131k, curriculum 1k -> 131k (200 steps a stage)":
                 ("ps_131k.yaml", ["data.curriculum.start_seq_len=1024", "data.curriculum.stage_steps=200"], 1600)}
    out = []
    for name, (recipe, overrides, steps) in cases.items():
        cfg, seed, accum, _ = load_recipe(str(REPO / "recipes" / recipe), overrides)
        stream = TrainStream.planned(cfg, {"default": (272000, 131072)}, 1, accum, seed)
        for stage in diversity_stats(stream, 0, steps):
            out.append({"case": name, **stage})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--lengths", default="1024,131072")
    parser.add_argument("--work", type=Path, default=REPO / "data" / "bench_mixture")
    args = parser.parse_args()
    if not MORE.exists():
        sys.exit(f"needs {MORE} (the project's shared data); not present on this machine")
    torch.set_num_threads(1)
    collection = write_collection(args.work / "genomes.yaml")
    sharder = bench_sharder(collection, args.work)
    print(f"sharder: {sharder['bases'] / 1e6:.1f} Mbp in 3 genomes | one after the other, 1 worker: "
          f"{sharder['single_s']:.1f} s = {sharder['single_mbps']:.1f} Mbp/s | --collection, 2 at a time: "
          f"{sharder['collection_s']:.1f} s = {sharder['collection_mbps']:.1f} Mbp/s | ratio {sharder['ratio']:.2f}x",
          flush=True)
    loader = bench_loader(args.work / "collection", [int(x) for x in args.lengths.split(",")], args.seconds)
    for row in loader:
        print(f"loader L={row['seq_len']}: one worker, tokens per CPU second: single source (chr20) "
              f"{row['single_tokens_per_cpu_s'] / 1e6:.1f} M | 3-source mixture {row['mixture_tokens_per_cpu_s'] / 1e6:.1f} M"
              f" | ratio {row['ratio']:.2f} | worker buffers {row['worker_buffer_mib']:.0f} MiB per 2^20-token batch",
              flush=True)
    diversity = bench_diversity()
    for row in diversity:
        print(f"diversity {row['case']} stage {row['stage']} (L {row['seq_len']}, {row['rows_per_step']} rows/step): "
              f"distinct windows {row['distinct_windows']} vs independent {row['distinct_independent']} "
              f"(ratio {row['distinct_ratio']}); next-step reuse {row['reuse_next_step']} vs {row['reuse_independent']} "
              f"(ratio {row['reuse_ratio']})")
    print(json.dumps({"sharder": sharder, "loader": loader, "diversity": diversity}))


if __name__ == "__main__":
    main()
