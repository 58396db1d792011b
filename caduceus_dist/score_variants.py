"""Zero-shot variant effect scores from a pretrained Caduceus (masked marginals).

    python -m caduceus_dist.score_variants --checkpoint DIR --fasta F --vcf V --window 131072 --out OUT.tsv

SNV: log p(ALT) - log p(REF) at the variant's position, masked, in a window centred on it (shifted to
fit at contig ends). Indel or multi-base variant: the shared prefix and suffix of REF and ALT are
trimmed, the differing bases masked all at once in the reference and in the alternative haplotype,
and the score is the sum of the alternative bases' log-likelihoods minus the reference bases' (a
length-dependent score: compare indels of equal length; docs/inference.md §4).
Strands: Ph averages the forward window and its reverse complement; PS is exactly strand-symmetric
and needs one pass (--strands both computes the second anyway, e.g. to check that). Every VCF row and
ALT allele gets one output row, scored or with the reason it was not; --strict makes the first
unusable row (REF not matching the FASTA, unknown contig, symbolic allele) an error instead. SNVs at
one position share their masked window, and windows of equal length share a forward pass.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from caduceus_dist import inference
from caduceus_dist.fsio import atomic_write
from caduceus_dist.inference import InferenceError
from caduceus_dist.model.tokenizer import MASK_ID, CaduceusTokenizer

COLUMNS = ("chrom", "pos", "id", "ref", "alt", "kind", "score", "score_forward", "score_reverse", "status", "vcf_line")
BASES = frozenset("ACGTN")
encode = CaduceusTokenizer().encode  # str -> token ids (uint8)


@dataclass
class Variant:
    line: int
    chrom: str  # as the VCF names it
    pos: int  # 1-based, as in the VCF
    vid: str
    ref: str
    alt: str
    contig: str | None = None  # the FASTA's name
    kind: str = ""
    status: str = "scored"
    strands: dict[str, float] = field(default_factory=dict)  # "forward" / "reverse" -> score

    @property
    def score(self) -> float | None:
        return float(np.mean(list(self.strands.values()))) if self.strands and self.status == "scored" else None


@dataclass
class Job:
    """One masked window: token ids (masks applied) and the masked offsets whose log-probabilities are read."""

    ids: np.ndarray
    positions: np.ndarray
    log_probs: dict[str, np.ndarray] = field(default_factory=dict)  # strand -> (len(positions), vocab), forward-strand ids


def read_vcf(path: Path) -> list[Variant]:
    """One Variant per (row, ALT allele); plain or gzip/BGZF VCF."""
    if not path.is_file():
        raise InferenceError(f"--vcf {path} does not exist")
    with open(path, "rb") as fh:
        opener = gzip.open if fh.read(2) == b"\x1f\x8b" else open
    variants = []
    try:
        with opener(path, "rt") as fh:
            for number, text in enumerate(fh, start=1):
                if text.startswith("#") or not text.strip():
                    continue
                fields = text.rstrip("\r\n").split("\t")
                if len(fields) < 5 or not fields[1].isdigit():
                    raise InferenceError(f"{path}, line {number}: not a VCF data line (need CHROM, POS, ID, REF, ALT "
                                         "tab-separated, POS an integer)")
                for alt in fields[4].split(","):
                    variants.append(Variant(number, fields[0], int(fields[1]), fields[2], fields[3].upper(), alt.upper()))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InferenceError(f"{path}: unreadable ({exc}); is it a (gzipped) VCF?") from None
    return variants


def check(variant: Variant, contigs: inference.ContigNames, tokens: np.ndarray | None = None) -> str | None:
    """Why the variant cannot be scored (None if it can). Without `tokens`, the checks that need no sequence."""
    if not set(variant.alt) <= BASES or not variant.alt:
        return f"ALT {variant.alt!r} is symbolic or not a DNA allele"
    if not set(variant.ref) <= BASES or not variant.ref:
        return f"REF {variant.ref!r} is not a DNA allele"
    if variant.alt == variant.ref:
        return "ALT equals REF"
    variant.contig = contigs.resolve(variant.chrom)
    if variant.contig is None:
        return f"contig {variant.chrom!r} is not in the FASTA (also tried with and without 'chr')"
    if tokens is None:
        return None
    start, end = variant.pos - 1, variant.pos - 1 + len(variant.ref)
    if end > len(tokens):
        return f"REF ends at {end}, past the end of {variant.contig} (length {len(tokens)})"
    found = tokens[start:end]
    if not np.array_equal(found, encode(variant.ref)):
        return (f"REF {variant.ref!r} does not match the FASTA ({CaduceusTokenizer.decode(found)!r} at "
                f"{variant.contig}:{variant.pos})")
    return None


def window_start(centre: int, length: int, contig_length: int) -> int:
    """Start of a `length` window centred on `centre`, shifted to lie inside the contig."""
    return max(0, min(centre - length // 2, contig_length - length))


class Planner:
    """Turns variants into masked windows (Jobs), sharing one window among the SNVs of a position."""

    def __init__(self, tokens: np.ndarray, window: int, share: bool):
        self.tokens, self.window, self.share = tokens, window, share
        self.jobs: dict[tuple, Job] = {}
        self.unshared = 0

    def masked(self, key: tuple, ids: np.ndarray, positions: np.ndarray) -> Job:
        if not self.share:
            key, self.unshared = (*key, self.unshared), self.unshared + 1
        if key not in self.jobs:
            ids = ids.copy()
            ids[positions] = MASK_ID
            self.jobs[key] = Job(ids, positions)
        return self.jobs[key]

    def reference(self, start: int, span: int) -> Job:
        """The reference window around [start, start + span), that span masked."""
        ws = window_start(start + span // 2, self.window, len(self.tokens))
        return self.masked(("ref", start, span), self.tokens[ws:ws + self.window], np.arange(start - ws, start - ws + span))

    def alternative(self, start: int, ref_span: int, alt: np.ndarray, key: tuple) -> Job:
        """The alternative haplotype's window: left flank as the reference window's, ALT, then the right flank."""
        ws = window_start(start + ref_span // 2, self.window, len(self.tokens))
        left = self.tokens[ws:start]
        right = self.tokens[start + ref_span:start + ref_span + max(0, self.window - len(left) - len(alt))]
        ids = np.concatenate([left, alt, right])[:self.window]
        return self.masked(("alt", *key), ids, np.arange(len(left), len(left) + len(alt)))


def plan(variant: Variant, planner: Planner) -> list[tuple[Job, list[tuple[int, int, int]]]]:
    """[(job, [(row in job.positions, token, sign)])]: the score is the signed sum of those log-probabilities."""
    ref, alt = variant.ref, variant.alt
    prefix = 0
    while prefix < min(len(ref), len(alt)) and ref[prefix] == alt[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(ref), len(alt)) - prefix and ref[-1 - suffix] == alt[-1 - suffix]:
        suffix += 1
    ref_part, alt_part = ref[prefix:len(ref) - suffix], alt[prefix:len(alt) - suffix]
    start = variant.pos - 1 + prefix
    if len(ref_part) == len(alt_part) == 1:
        variant.kind = "snv"
        job = planner.reference(start, 1)
        return [(job, [(0, int(encode(alt_part)[0]), 1), (0, int(encode(ref_part)[0]), -1)])]
    variant.kind = ("deletion" if not alt_part else "insertion" if not ref_part else
                    "mnv" if len(ref_part) == len(alt_part) else "complex")
    terms = []
    if ref_part:
        job = planner.reference(start, len(ref_part))
        terms.append((job, [(i, int(t), -1) for i, t in enumerate(encode(ref_part))]))
    if alt_part:
        job = planner.alternative(start, len(ref_part), encode(alt_part), (variant.line, variant.alt))
        terms.append((job, [(i, int(t), 1) for i, t in enumerate(encode(alt_part))]))
    return terms


def run_jobs(model, jobs: list[Job], strands: list[str], max_tokens: int, device: torch.device, progress) -> None:
    """Fill each job's log_probs per strand; windows of equal length are batched up to max_tokens."""
    complement = torch.tensor(model.config.padded_complement_map())
    for length, batch in inference.equal_length_batches(jobs, lambda job: len(job.ids), max_tokens):
        ids = torch.from_numpy(np.stack([job.ids for job in batch]).astype(np.int64))
        for strand in strands:
            strand_ids = complement[ids].flip(-1) if strand == "reverse" else ids
            with torch.inference_mode():
                log_probs = torch.log_softmax(model(strand_ids.to(device)).float(), dim=-1).cpu()
            for row, job in enumerate(batch):
                positions = torch.from_numpy(job.positions)
                if strand == "reverse":  # back to forward-strand positions and base ids
                    job.log_probs[strand] = log_probs[row, length - 1 - positions][:, complement].numpy()
                else:
                    job.log_probs[strand] = log_probs[row, positions].numpy()
        progress.update(len(batch))


def score_variants(model, fasta: Path, variants: list[Variant], window: int, strands: list[str], max_tokens: int,
                   device: torch.device, strict: bool, share: bool = True, quiet: bool = True) -> list[Variant]:
    """Score `variants` in place (status says why one was not); `share=False` is the one-window-per-variant baseline."""
    contigs = inference.ContigNames(inference.fasta_names(fasta))
    todo: dict[str, list[Variant]] = defaultdict(list)
    for variant in variants:
        problem = check(variant, contigs)
        if problem is None:
            todo[variant.contig].append(variant)
        else:
            fail(variant, problem, strict)
    progress = inference.Progress(0, "windows", quiet)  # the total grows contig by contig, as windows are planned
    try:
        for contig, tokens in inference.stream_contigs(fasta, set(todo)):
            planner = Planner(tokens, window, share)
            terms = {}
            for variant in todo[contig]:
                problem = check(variant, contigs, tokens=tokens)
                if problem is None:
                    terms[id(variant)] = plan(variant, planner)
                else:
                    fail(variant, problem, strict)
            progress.grow(len(planner.jobs))
            run_jobs(model, list(planner.jobs.values()), strands, max_tokens, device, progress)
            for variant in todo[contig]:
                for strand in strands if id(variant) in terms else ():
                    variant.strands[strand] = sum(sign * float(job.log_probs[strand][row, token])
                                                  for job, picks in terms[id(variant)] for row, token, sign in picks)
    finally:
        progress.close()
    return variants


def fail(variant: Variant, problem: str, strict: bool) -> None:
    if strict:
        raise InferenceError(f"VCF line {variant.line} ({variant.chrom}:{variant.pos} {variant.ref}>{variant.alt}): "
                             f"{problem}; fix the VCF or --fasta, or drop --strict to skip such rows")
    variant.status = f"skipped: {problem}"


def write_tsv(path: Path, variants: list[Variant]) -> None:
    def number(value: float | None) -> str:
        return "NA" if value is None else f"{value:.6g}"

    lines = ["\t".join(COLUMNS)]
    for v in variants:
        lines.append("\t".join((v.chrom, str(v.pos), v.vid, v.ref, v.alt, v.kind or "NA", number(v.score),
                                number(v.strands.get("forward")), number(v.strands.get("reverse")), v.status,
                                str(v.line))))
    atomic_write(path, "\n".join(lines) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inference.add_common_arguments(p, "reference FASTA the VCF is on (plain, gzip or BGZF)", "windows")
    p.add_argument("--vcf", required=True, help="variants (plain or gzipped VCF)")
    p.add_argument("--out", required=True, help="output TSV (one row per VCF row and ALT allele)")
    p.add_argument("--window", type=int, default=131072, help="bases of context around each variant")
    p.add_argument("--strands", choices=("auto", "both", "forward"), default="auto",
                   help="auto: both for Ph, forward for PS (exactly strand-symmetric)")
    p.add_argument("--strict", action="store_true", help="stop at the first row that cannot be scored")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    started = time.perf_counter()
    try:
        if args.window < 1:
            raise InferenceError(f"--window must be >= 1, got {args.window}")
        variants = read_vcf(Path(args.vcf))
        model, device, max_tokens = inference.setup(args)
        forward_only = args.strands == "forward" or (args.strands == "auto" and model.config.rcps)
        strands = ["forward"] if forward_only else ["forward", "reverse"]
        score_variants(model, Path(args.fasta), variants, args.window, strands, max_tokens, device, args.strict,
                       quiet=args.quiet)
        write_tsv(Path(args.out), variants)
    except InferenceError as exc:
        print(f"score_variants: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not args.quiet:
        scored = [v for v in variants if v.status == "scored"]
        kinds = defaultdict(int)
        for v in scored:
            kinds[v.kind] += 1
        seconds = time.perf_counter() - started
        print(f"scored {len(scored)} of {len(variants)} allele(s) ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}"
              f"; {len(variants) - len(scored)} skipped, reasons in the status column) in {seconds:.1f} s "
              f"-> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    from caduceus_dist.distributed import exit_process

    exit_process(main())
