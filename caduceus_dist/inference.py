"""What the inference commands (embed, score_variants) share: the model loaded for inference, the
contigs a FASTA streams, contig names matched with or without "chr", and a progress bar.

Inference keeps no activations for backward (`torch.inference_mode`), so memory is the weights plus
the transient activations of one layer (docs/inference.md §3 gives the measurement).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from caduceus_dist.prep.splits import bare_contig
from caduceus_dist.shard_format import token_ids

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class InferenceError(ValueError):
    """Bad input to an inference command; the message names the file, line or option and what to do."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InferenceError("--device cuda: this machine has no CUDA GPU; use --device cpu")
    return torch.device(name)


def tokens_per_pass(requested: int, device: torch.device) -> int:
    """--max-tokens; 0 (the default) picks 2^17 on a GPU and one sequence per pass on a CPU, where batching
    gained nothing beyond run-to-run noise (benchmarks/RESULTS.md, inference)."""
    if requested < 0:
        raise InferenceError(f"--max-tokens must be >= 0 (0: automatic), got {requested}")
    return requested or ((1 << 17) if device.type == "cuda" else 1)


def load_model(checkpoint: Path, device: torch.device, dtype: str, scan_chunk_size: int = 0):
    """CaduceusForMaskedLM in eval mode from an export (Hugging Face directory) or a run / checkpoint directory."""
    from caduceus_dist import export
    from caduceus_dist.model.mamba import Mamba

    if not checkpoint.is_dir():
        raise InferenceError(f"--checkpoint {checkpoint} is not a directory; pass an export directory "
                             "(python -m caduceus_dist.export RUN --out DIR) or a run directory")
    try:
        model, _ = export.load_model(checkpoint)
    except export.ExportError as exc:
        raise InferenceError(str(exc)) from None
    for module in model.modules():
        if isinstance(module, Mamba):
            module.scan_chunk_size = scan_chunk_size
    return model.to(device=device, dtype=DTYPES[dtype]).eval().requires_grad_(False)


def add_common_arguments(parser: argparse.ArgumentParser, fasta_help: str, unit: str) -> None:
    """The options every inference command has; `unit` names what --max-tokens batches (regions, windows)."""
    parser.add_argument("--checkpoint", required=True, help="export directory or run directory")
    parser.add_argument("--fasta", required=True, help=fasta_help)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute precision")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--max-tokens", type=int, default=0,
                        help=f"bases per forward pass, equal-length {unit} batched (0: 2^17 on GPU, one on CPU)")
    parser.add_argument("--scan-chunk-size", type=int, default=0, help="scan positions per chunk (0: automatic)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def setup(args: argparse.Namespace):
    """(model, device, bases per pass) for the common arguments; the FASTA checked to exist."""
    if not Path(args.fasta).is_file():
        raise InferenceError(f"--fasta {args.fasta} does not exist")
    device = pick_device(args.device)
    model = load_model(Path(args.checkpoint), device, args.dtype, args.scan_chunk_size)
    return model, device, tokens_per_pass(args.max_tokens, device)


def equal_length_batches(items: list, length_of, max_tokens: int) -> Iterator[tuple[int, list]]:
    """(length, batch) of items of equal length, each batch up to max_tokens bases (at least one item)."""
    by_length: dict[int, list] = defaultdict(list)
    for item in items:
        by_length[length_of(item)].append(item)
    for length, group in sorted(by_length.items()):
        per_batch = max(1, max_tokens // length)
        for first in range(0, len(group), per_batch):
            yield length, group[first:first + per_batch]


class ContigNames:
    """Maps the contig names of a BED or VCF onto a FASTA's: exact, else with or without the "chr" prefix."""

    def __init__(self, fasta_names: Iterable[str]):
        self.exact = set(fasta_names)
        self.bare = {bare_contig(name): name for name in self.exact}

    def resolve(self, name: str) -> str | None:
        return name if name in self.exact else self.bare.get(bare_contig(name))


def fasta_names(fasta: Path) -> list[str]:
    """Record names, from the .fai index when there is one (no pass over the sequence), else by streaming."""
    index = Path(str(fasta) + ".fai")
    if index.is_file():
        return [line.split("\t", 1)[0] for line in index.read_text().splitlines() if line.strip()]
    return [name for name, _ in stream_contigs(fasta, None)]


def stream_contigs(fasta: Path, wanted: set[str] | None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, token ids) of each wanted record (all when None), one record in memory at a time."""
    from caduceus_dist.prep.fasta import FastaError, FastaReader

    try:
        reader = FastaReader(fasta)
        try:
            for record in reader:
                if wanted is None or record.name in wanted:
                    yield record.name, token_ids(record.tokens)
        finally:
            reader.close()
    except FastaError as exc:
        raise InferenceError(str(exc)) from None


class Progress:
    """A tqdm bar on stderr (off with quiet or when stderr is not a terminal)."""

    def __init__(self, total: int, unit: str, quiet: bool):
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr, leave=False)

    def grow(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
