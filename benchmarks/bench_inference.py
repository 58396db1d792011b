"""Inference with the Caduceus-PS 131k architecture (d_model 256, 16 layers, random weights) on CPU:
embedding memory against the grad-enabled forward the reference's Hub classifier runs (its issue #4),
and variant scoring throughput against one masked window per variant.

    .venv/bin/python benchmarks/bench_inference.py             # ~6 min on 2 cores, 13 GB peak
    .venv/bin/python benchmarks/bench_inference.py --quick     # small lengths only
    python benchmarks/bench_inference.py --only memory --device cuda    # on a GPU (gpu_check.sh runs it)

Memory: each case runs in a fresh subprocess; peak is ru_maxrss after one forward minus the RSS just
before it (model and input allocated), so it is the activations alone. The per-position figure is the
least-squares slope over the lengths; the longest region that fits is (budget - weights) / slope.
Variants: the embedded GRCh37 chr20 piece, every alternative allele at --positions positions (3 SNVs
each) and its 4 real indels, --window bases of context; ours shares the masked window of a position
and batches equal-length windows (--max-tokens, as the command picks it), the baseline
runs one window per allele per pass. A batch-size sweep of the forward pass is printed first.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM  # noqa: E402

PS_131K = {"d_model": 256, "n_layer": 16, "vocab_size": 12, "rcps": True, "residual_in_fp32": False}


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def memory_case(length: int, grad: bool, device: str) -> dict:
    """Child process: one forward of a (1, length) input; peak activation bytes (RSS on CPU, the CUDA
    allocator's peak on a GPU)."""
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusConfig(**PS_131K)).eval().to(device)
    if not grad:
        model.requires_grad_(False)
    ids = torch.randint(7, 11, (1, length), device=device)
    model(torch.randint(7, 11, (1, 64), device=device))  # warm-up: lazy initialisation, kernels
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else rss_bytes()
    start = time.perf_counter()
    if grad:
        hidden = model.caduceus(ids)
        hidden.float().mean().backward()  # keeps every activation until here, as a fine-tuning step does
    else:
        from caduceus_dist.model.caduceus import conjoined_hidden

        with torch.inference_mode():
            conjoined_hidden(model.caduceus.backbone, ids, model.config).mean(1)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"length": length, "grad": grad, "activation_bytes": peak - before, "seconds": seconds, "weights": weights}


def run_child(length: int, grad: bool, device: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(length), str(int(grad)), "--device", device],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(lengths: list[int], device: str) -> None:
    print(f"{'length':>8} {'inference MB':>13} {'tokens/s':>9} {'grad fwd+bwd MB':>16} {'ratio':>6}")
    results = {}
    for length in lengths:
        ours, base = run_child(length, False, device), run_child(length, True, device)
        results[length] = (ours, base)
        print(f"{length:>8} {ours['activation_bytes'] / 2**20:>13.0f} {length / ours['seconds']:>9.0f} "
              f"{base['activation_bytes'] / 2**20:>16.0f} {base['activation_bytes'] / ours['activation_bytes']:>6.1f}x")
    lengths = sorted(results)
    ours_slope, base_slope = (np.polyfit(lengths, [results[n][which]["activation_bytes"] for n in lengths], 1)[0]
                              for which in (0, 1))
    weights = results[lengths[-1]][0]["weights"]
    print(f"per position: inference {ours_slope / 1024:.1f} KiB, grad-enabled {base_slope / 1024:.1f} KiB "
          f"({base_slope / ours_slope:.1f}x); weights {weights / 2**20:.0f} MB")
    budgets = ((80, "GPU, 80 GB (measured slope)"),) if device == "cuda" else (
        (24, "CPU, 24 GB (measured slope)"), (80, "GPU, 80 GB (computed from the CPU slope)"))
    for budget_gb, where in budgets:
        budget = budget_gb * 10**9 - weights
        print(f"  longest region, {where}: inference {budget / ours_slope / 1e6:.1f} Mbp, "
              f"grad-enabled {budget / base_slope / 1e6:.2f} Mbp")


def batch_sweep(length: int) -> None:
    """Forward tokens/s at batch 1, 4, 16 (best of 3): whether batching pays on this CPU."""
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusConfig(**PS_131K)).eval().requires_grad_(False)
    rates = []
    for batch in (1, 4, 16):
        ids = torch.randint(7, 11, (batch, length))
        seconds = []
        with torch.inference_mode():
            for _ in range(3):  # the best of 3: the first pass at a new size pays for fresh pages
                start = time.perf_counter()
                model(ids)
                seconds.append(time.perf_counter() - start)
        rates.append(batch * length / min(seconds))
    print(f"forward at L={length}: " + ", ".join(f"batch {b}: {r:.0f} tokens/s" for b, r in zip((1, 4, 16), rates,
                                                                                            strict=True)))


def variants(window: int, positions: int, max_tokens: int) -> None:
    from caduceus_dist.inference import pick_device, tokens_per_pass
    from caduceus_dist.score_variants import Variant, read_vcf, score_variants

    sample = ROOT / "caduceus_dist" / "sample"
    fasta = sample / "grch37_chr20_sample.fa.gz"
    indels = [v for v in read_vcf(sample / "grch37_chr20_sample.vcf") if len(v.ref) != len(v.alt)]
    from caduceus_dist.inference import stream_contigs

    (name, tokens), = stream_contigs(fasta, None)
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(np.arange(window, len(tokens) - window), positions, replace=False))
    snvs = [Variant(0, name, int(p) + 1, ".", b, a) for p in chosen for b in ["ACGTN"[tokens[p] - 7]]
            for a in "ACGT" if a != b]
    torch.manual_seed(0)
    model = CaduceusForMaskedLM(CaduceusConfig(**PS_131K)).eval().requires_grad_(False)
    device = pick_device("cpu")
    max_tokens = tokens_per_pass(max_tokens, device)
    timings = {}
    for label, share, per_pass in (("ours (shared windows, batched)", True, max_tokens),
                                   ("baseline (one window per allele)", False, window)):
        todo = [Variant(v.line, v.chrom, v.pos, v.vid, v.ref, v.alt) for v in snvs + indels]
        start = time.perf_counter()
        score_variants(model, fasta, todo, window, ["forward"], per_pass, device, strict=False, share=share)
        timings[label] = (time.perf_counter() - start, todo)
    (ours_s, ours), (base_s, base) = timings.values()
    diff = max(abs(a.score - b.score) for a, b in zip(ours, base, strict=True))
    n = len(ours)
    print(f"{n} alleles ({len(snvs)} SNVs at {positions} positions, {len(indels)} indels), window {window}:")
    for label, (seconds, _) in timings.items():
        print(f"  {label:<34} {seconds:7.2f} s  {n / seconds:7.2f} variants/s")
    print(f"  ratio {base_s / ours_s:.2f}x; largest score difference {diff:.2e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="memory cases on this device (cuda: the allocator's peak; gpu_check.sh runs it)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--positions", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=0, help="ours: bases per pass (0: as the command picks)")
    p.add_argument("--only", choices=("memory", "variants"), default=None)
    args = p.parse_args()
    if args.child:
        print(json.dumps(memory_case(args.child[0], bool(args.child[1]), args.device)))
        return
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, Caduceus-PS d_model 256 x 16 layers\n")
    if args.only != "variants":
        cuda_lengths = [16384, 32768, 65536]  # grad-enabled at 65536: ~60 GB at the CPU's slope
        memory([2048, 4096] if args.quick else cuda_lengths if args.device == "cuda" else [4096, 8192, 12288],
               args.device)
        print()
    if args.only != "memory":
        batch_sweep(1024 if args.quick else args.window)
        variants(1024 if args.quick else args.window, 8 if args.quick else args.positions, args.max_tokens)


if __name__ == "__main__":
    main()
