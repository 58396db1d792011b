"""Embeddings of genomic regions from a pretrained Caduceus.

    python -m caduceus_dist.embed --checkpoint DIR --fasta F [--bed REGIONS] --out OUT
                                  [--per-position] [--dtype fp32|bf16] [--max-tokens N]

DIR is an export (python -m caduceus_dist.export) or a run directory. Regions are the BED rows
(chrom, start, end[, name]; contigs matched with or without "chr"; the 4th column names the regions
when its values are unique, else they are named chrom:start-end), or every FASTA record. Each
region gives its mean-pooled embedding (one row of D floats) or, with --per-position, one row per
base. Strands: PS averages its two RC halves, Ph averages the forward pass with the flipped pass over
the reverse complement (the paper's post-hoc conjoining; --no-conjoin skips it), so an embedding and
that of the reverse complement agree (per position: flipped). Regions of equal length are batched up
to --max-tokens per forward pass; the scan has no length limit. OUT gets float32 NumPy shards
(`embeddings-NNNNN.npy`), `index.tsv` (name, chrom, start, end, file, row, rows) and `embed.json`,
written under OUT.partial and renamed when complete. docs/inference.md has the details.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from caduceus_dist.inference import (
    ContigNames,
    InferenceError,
    Progress,
    add_common_arguments,
    equal_length_batches,
    fasta_names,
    setup,
    stream_contigs,
)

INDEX_COLUMNS = ("name", "chrom", "start", "end", "file", "row", "rows")


@dataclass
class Region:
    order: int  # position in the input (BED line order or FASTA record order)
    name: str
    chrom: str  # the FASTA's name for the contig
    start: int
    end: int


def bed_regions(bed: Path, contigs: ContigNames) -> list[Region]:
    from caduceus_dist.prep.splits import SplitError, read_bed

    try:
        rows = read_bed(bed, need_label=False)
    except SplitError as exc:
        raise InferenceError(str(exc)) from None
    labels = [row.label for row in rows]
    unique_labels = all(labels) and len(set(labels)) == len(labels)  # a split BED's labels repeat: not names
    regions = []
    for row in rows:
        chrom = contigs.resolve(row.chrom)
        if chrom is None:
            raise InferenceError(f"{bed}, line {row.line}: contig {row.chrom!r} is not in the FASTA (also tried "
                                 "with and without 'chr'); fix the BED or pass the matching --fasta")
        name = row.label if unique_labels else f"{row.chrom}:{row.start}-{row.end}"
        regions.append(Region(len(regions), name, chrom, row.start, row.end))
    return regions


class ShardWriter:
    """Rows appended in any order, written as float32 .npy shards of about `shard_bytes`; `where` records each
    region's (file, first row, rows) for the index."""

    def __init__(self, directory: Path, shard_bytes: int):
        self.directory, self.shard_bytes = directory, shard_bytes
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        self.shards = 0
        self.where: dict[int, tuple[str, int, int]] = {}

    def add(self, order: int, rows: np.ndarray) -> None:
        self.where[order] = (self.file_name(self.shards), self.pending_rows, len(rows))
        self.pending.append(rows)
        self.pending_rows += len(rows)
        self.pending_bytes += rows.nbytes
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    @staticmethod
    def file_name(number: int) -> str:
        return f"embeddings-{number:05d}.npy"

    def flush(self) -> None:
        if self.pending:
            np.save(self.directory / self.file_name(self.shards), np.concatenate(self.pending))
            self.shards += 1
            self.pending, self.pending_rows, self.pending_bytes = [], 0, 0


def embed_batch(model, ids: torch.Tensor, per_position: bool, conjoin: bool) -> np.ndarray:
    """(B, L) token ids -> (B, D) pooled or (B, L, D) per-position float32 embeddings."""
    from caduceus_dist.model.caduceus import conjoined_hidden

    backbone = model.caduceus.backbone
    with torch.inference_mode():
        hidden = conjoined_hidden(backbone, ids, model.config) if conjoin else backbone(ids)
        hidden = hidden.float()
        return (hidden if per_position else hidden.mean(dim=1)).cpu().numpy()


def embed(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise InferenceError(f"--out {out} already exists; pass --overwrite to replace it, or choose another --out")
    fasta = Path(args.fasta)
    model, device, args.max_tokens = setup(args)
    regions = bed_regions(Path(args.bed), ContigNames(fasta_names(fasta))) if args.bed else None
    by_contig: dict[str, list[Region]] = defaultdict(list)
    for region in regions or []:
        by_contig[region.chrom].append(region)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    writer = ShardWriter(staging, args.shard_mb << 20)
    progress = Progress(sum(r.end - r.start for r in regions) if regions else 0, "bp", args.quiet)
    done: list[Region] = []
    try:
        for chrom, tokens in stream_contigs(fasta, set(by_contig) if regions is not None else None):
            if regions is None:  # whole-FASTA mode: the record is the region, its length known now
                todo = [Region(len(done), chrom, chrom, 0, len(tokens))]
                progress.grow(len(tokens))
            else:
                todo = by_contig[chrom]
            for region in todo:
                if region.end > len(tokens):
                    raise InferenceError(f"{args.bed}: region {region.name} ({region.chrom}:{region.start}-"
                                         f"{region.end}) ends past the contig's length {len(tokens)}; clip it")
            embed_contig(model, tokens, todo, writer, args, device, progress)
            done.extend(todo)
        writer.flush()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the previous --out, if any, is untouched
        raise
    finally:
        progress.close()
    write_index(staging, sorted(done, key=lambda r: r.order), writer.where)
    dim = model.config.d_model * (2 if model.config.rcps and args.no_conjoin else 1)
    (staging / "embed.json").write_text(json.dumps({
        "checkpoint": str(args.checkpoint), "fasta": str(fasta), "bed": args.bed, "regions": len(done),
        "dim": dim, "per_position": args.per_position, "conjoined": not args.no_conjoin, "dtype": args.dtype,
        "variant": "PS" if model.config.rcps else "Ph", "storage": "float32",
    }, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def embed_contig(model, tokens: np.ndarray, regions: list[Region], writer: ShardWriter, args, device, progress) -> None:
    """Equal-length regions go through the model together, up to --max-tokens per batch."""
    for length, batch in equal_length_batches(regions, lambda r: r.end - r.start, args.max_tokens):
        ids = torch.from_numpy(np.stack([tokens[r.start:r.end] for r in batch]).astype(np.int64)).to(device)
        vectors = embed_batch(model, ids, args.per_position, not args.no_conjoin)
        for region, vector in zip(batch, vectors, strict=True):
            writer.add(region.order, vector.reshape(-1, vector.shape[-1]))
        progress.update(length * len(batch))


def write_index(directory: Path, regions: list[Region], where: dict[int, tuple[str, int, int]]) -> None:
    lines = ["\t".join(INDEX_COLUMNS)]
    for region in regions:
        file, row, rows = where[region.order]
        lines.append("\t".join(map(str, (region.name, region.chrom, region.start, region.end, file, row, rows))))
    (directory / "index.tsv").write_text("\n".join(lines) + "\n")


def read_embeddings(out: str | Path) -> dict[str, np.ndarray]:
    """{region name: (D,) or (L, D) array} of an embed output directory (loads every shard; for small outputs)."""
    out = Path(out)
    shards: dict[str, np.ndarray] = {}
    result = {}
    rows = (line.split("\t") for line in (out / "index.tsv").read_text().splitlines()[1:])
    per_position = json.loads((out / "embed.json").read_text())["per_position"]
    for name, _chrom, _start, _end, file, row, count in rows:
        if file not in shards:
            shards[file] = np.load(out / file, mmap_mode="r")
        block = np.asarray(shards[file][int(row):int(row) + int(count)])
        result[name] = block if per_position else block[0]
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p, "FASTA (plain, gzip or BGZF)", "regions")
    p.add_argument("--bed", default=None, help="regions (chrom, start, end[, name]); default: every FASTA record")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--per-position", action="store_true", help="one row per base instead of the mean")
    p.add_argument("--no-conjoin", action="store_true",
                   help="raw forward-strand hidden states (PS: both halves, 2*d_model; Ph: one pass)")
    p.add_argument("--shard-mb", type=int, default=256, help="approximate size of each .npy shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = embed(args)
    except InferenceError as exc:
        print(f"embed: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not args.quiet:
        meta = json.loads((out / "embed.json").read_text())
        print(f"embedded {meta['regions']} region(s) ({meta['variant']}, dim {meta['dim']}"
              f"{', per position' if meta['per_position'] else ''}) -> {out}/index.tsv", flush=True)
    return 0


if __name__ == "__main__":
    from caduceus_dist.distributed import exit_process

    exit_process(main())
