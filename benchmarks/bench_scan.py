"""Selective scan and whole Caduceus-PS model on CPU: the native (C) and pure-PyTorch backends vs a sequential scan.

    .venv/bin/python benchmarks/bench_scan.py --threads 1          # full run (~8 min on 2 quiet cores)
    .venv/bin/python benchmarks/bench_scan.py --quick              # L = 1k only
    .venv/bin/python benchmarks/bench_scan.py --lengths 8192 --skip-model   # one scan length
    .venv/bin/python benchmarks/bench_scan.py --lengths 512                 # the issue's reference comparison

Both of ours run in every case: `native` (kernel backend "native", the C kernels) and `torch` (the
pure-PyTorch chunked scan, kept as the fallback where no C compiler exists).

Every case runs forward+backward in a fresh subprocess, after a warm-up at L=64: peak memory is that
process's ru_maxrss after its first full-length step minus its RSS just before it (inputs and model
already allocated); throughput is that of the following --steady-steps steps (default 1), as in
training, where the first step's one-off costs (fresh pages, lazy initialisation) do not recur.
The baseline is a straightforward sequential scan: one position at a time under autograd, per-step
tensors taken with unbind (linear in L; the reference's selective_scan_ref indexes precomputed
(B, E, L, N) tensors instead, whose backward is quadratic in L, so this baseline is the faster of
the two). The whole-model baseline is the same model with that scan plugged into the kernel
registry. Throughput is tokens per second of wall time and of process CPU time (the second is
robust to other jobs sharing the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caduceus_dist.loss import mlm_loss
from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM, native_ops, scan
from caduceus_dist.model.kernels import KERNEL_BACKENDS, TorchKernels

REFERENCE_TOKENS_PER_S = 29.0  # reference CPU path, PS d_model 128, 2 layers, L 512 (issue 2)
SEQUENTIAL_SKIP_LENGTH = 32768  # the sequential baseline would take too long (and ~20 GB) here
REFERENCE_STYLE_MAX_LENGTH = 512  # quadratic backward: minutes already at 1k on a shared box, hours at 8k


def sequential_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size=0):
    """docs/reference-model.md §4 one position at a time (grouped time-major layout), autograd through every step."""
    dt = F.softplus(delta.float() + delta_bias[:, None, None, :].float())
    u, Bm, Cm = u.float(), Bm.float(), Cm.float()
    state = u.new_zeros(*u.shape[:2], *A.shape[1:])
    ys = []
    for dt_t, u_t, b_t, c_t in zip(dt.unbind(2), u.unbind(2), Bm.unbind(2), Cm.unbind(2), strict=True):
        state = torch.exp(dt_t.unsqueeze(-1) * A[:, None]) * state + (dt_t * u_t).unsqueeze(-1) * b_t.unsqueeze(-2)
        ys.append((state * c_t.unsqueeze(-2)).sum(-1))
    y = torch.stack(ys, dim=2) + D[:, None, None, :] * u
    return (y * F.silu(z.float())).to(u.dtype)


def reference_style_scan(u, delta, A, Bm, Cm, D, z, delta_bias, chunk_size=0):
    """selective_scan_ref's structure: full (B, E, L, N) decay/input tensors, then index position i."""
    dt = F.softplus(delta.float() + delta_bias[:, None, None, :].float())
    decay = torch.exp(dt.unsqueeze(-1) * A[:, None, None])  # (G, B, L, E, N)
    inputs = (dt * u).unsqueeze(-1) * Bm.unsqueeze(-2)
    state = u.new_zeros(*u.shape[:2], *A.shape[1:])
    ys = []
    for i in range(u.shape[2]):
        state = decay[:, :, i] * state + inputs[:, :, i]
        ys.append((state * Cm[:, :, i].unsqueeze(-2)).sum(-1))
    y = torch.stack(ys, dim=2) + D[:, None, None, :] * u
    return (y * F.silu(z)).to(u.dtype)


OURS = ("native", "torch")  # kernel backend names; each is compared with the baselines
SCANS = {"native": native_ops.selective_scan, "torch": scan.selective_scan, "sequential": sequential_scan,
         "reference_style": reference_style_scan}


class SequentialKernels(TorchKernels):
    name = "sequential"
    selective_scan = staticmethod(sequential_scan)


class ReferenceStyleKernels(TorchKernels):
    name = "reference_style"
    selective_scan = staticmethod(reference_style_scan)


KERNEL_BACKENDS.update(sequential=SequentialKernels, reference_style=ReferenceStyleKernels)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_case(kind: str, impl: str, length: int, batch: int, d_model: int, n_layer: int, chunk: int,
             steady_steps: int) -> dict:
    """Forward+backward steps in this process after a short warm-up at a small length: the first gives
    the peak memory, the next `steady_steps` the throughput (the first alone when 0)."""
    torch.manual_seed(0)
    if kind == "scan":
        G, E, N = 2, 2 * d_model, 16  # one BiMamba layer of a PS model: 2 directions, 2 RC halves
        gen = torch.Generator().manual_seed(0)

        def make(L):
            shapes = [(G, 2 * batch, L, E)] * 2 + [(G, E, N)] + [(G, 2 * batch, L, N)] * 2 + [(G, E)] + \
                     [(G, 2 * batch, L, E), (G, E)]
            inputs = [torch.randn(*shape, generator=gen) for shape in shapes]
            inputs[2] = -inputs[2].abs() * 4
            inputs[7] = inputs[7] - 2
            return [t.requires_grad_() for t in inputs]

        scan = SCANS[impl]
        warm, inputs = make(64), make(length)

        def step(inputs=inputs):
            for t in inputs:
                t.grad = None  # as optimizer.zero_grad() does between training steps
            scan(*inputs, chunk_size=chunk).sum().backward()

        step(warm)  # warm-up at a short length: thread pool and allocator, without raising the peak
    else:
        config = CaduceusConfig(d_model=d_model, n_layer=n_layer, vocab_size=12, rcps=True, residual_in_fp32=False,
                                backend=impl, scan_chunk_size=chunk)
        model = CaduceusForMaskedLM(config)
        ids = torch.randint(7, 11, (batch, length), generator=torch.Generator().manual_seed(0))

        def step(ids=ids):
            model.zero_grad(set_to_none=True)
            loss, _ = mlm_loss(model(ids), ids)
            loss.backward()

        step(ids[:, :64])
    before = rss_mb()
    times = []
    for _ in range(1 + steady_steps):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
        if len(times) == 1:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    wall, cpu = (sum(t) / len(t) for t in zip(*(times[1:] or times), strict=True))
    tokens = batch * length
    return {"kind": kind, "impl": impl, "length": length, "batch": batch, "d_model": d_model, "n_layer": n_layer,
            "wall_s": wall, "cpu_s": cpu, "tok_s_wall": tokens / wall, "tok_s_cpu": tokens / cpu,
            "first_step_cpu_s": times[0][1], "peak_mb": max(peak, 0.0), "threads": torch.get_num_threads()}


def spawn(args: argparse.Namespace, **case) -> dict:
    case["steady_steps"] = args.steady_steps
    cmd = [sys.executable, __file__, "--_case", json.dumps(case), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def ratio(ours: dict, base: dict) -> str:
    return (f"{ours['tok_s_cpu'] / base['tok_s_cpu']:.1f}x faster (cpu), {ours['tok_s_wall'] / base['tok_s_wall']:.1f}x "
            f"(wall), {ours['peak_mb'] / max(base['peak_mb'], 1):.2f}x the memory")


def vs_reference(ours: dict) -> str:
    return (f"{ours['tok_s_cpu'] / REFERENCE_TOKENS_PER_S:.0f}x (cpu), {ours['tok_s_wall'] / REFERENCE_TOKENS_PER_S:.0f}x "
            f"(wall) the quoted {REFERENCE_TOKENS_PER_S:.0f} tok/s")


def fmt(r: dict) -> str:
    return f"{r['tok_s_wall']:9.0f} tok/s wall {r['tok_s_cpu']:9.0f} tok/s cpu {r['peak_mb']:7.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="L = 1k only")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1k 8k 32k)")
    parser.add_argument("--skip-model", action="store_true", help="scan cases only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch default)")
    parser.add_argument("--steady-steps", type=int, default=1,
                        help="timed steps after the first (which gives the peak memory); 0: time the first")
    parser.add_argument("--chunk", type=int, default=CaduceusConfig.scan_chunk_size, help="scan_chunk_size")
    parser.add_argument("--json", type=Path, help="also write all results here")
    parser.add_argument("--_case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._case:
        print(json.dumps(run_case(**json.loads(args._case))))
        return

    lengths = args.lengths or ([1024] if args.quick else [1024, 8192, 32768])
    results = []
    native_note = "" if native_ops.library() else " (native kernels UNAVAILABLE: 'native' runs fail)"
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads or 'default'}, "
          f"chunk {args.chunk}, load average {os.getloadavg()[0]:.1f}{native_note}; "
          "shared with other jobs, so compare the cpu columns")

    def compare(case: dict, label: str, baselines: list[str]) -> None:
        ours = {impl: spawn(args, impl=impl, **case) for impl in OURS}
        for impl in OURS:
            results.append(ours[impl])
            print(f"  {label}{impl:15s} {fmt(ours[impl])}", flush=True)
        for base_impl in baselines:
            base = spawn(args, impl=base_impl, **case)
            results.append(base)
            print(f"  {' ' * len(label)}{base_impl:15s} {fmt(base)}", flush=True)
            for impl in OURS:
                print(f"  {' ' * len(label)}  -> {impl} is {ratio(ours[impl], base)}")
        if case["kind"] == "model" and case["length"] == 512:
            for impl in OURS:
                print(f"  {' ' * len(label)}  -> {impl} is {vs_reference(ours[impl])}")

    kinds = [("scan", "scan: one PS BiMamba layer, G=2 directions x 2 RC halves, E=256, N=16, batch 1")]
    if not args.skip_model:
        kinds.append(("model", "model: PS d_model 128, 2 layers, batch 1"))
    for kind, title in kinds:
        print(f"\n{title} (forward+backward)")
        for length in lengths:
            case = dict(kind=kind, length=length, batch=1, d_model=128, n_layer=2, chunk=args.chunk)
            baselines = ["sequential"] if length < SEQUENTIAL_SKIP_LENGTH else []
            baselines += ["reference_style"] if length <= REFERENCE_STYLE_MAX_LENGTH else []
            compare(case, f"L={length:6d} ", baselines)
        if max(lengths) >= SEQUENTIAL_SKIP_LENGTH:
            print(f"  (sequential skipped at L>={SEQUENTIAL_SKIP_LENGTH}: it is linear in L, so expect 4x its 8k time "
                  f"and memory; reference_style only up to L={REFERENCE_STYLE_MAX_LENGTH}: its backward is quadratic)")
    if not args.skip_model and 512 not in lengths:
        print("\nreference comparison: PS d_model 128, 2 layers, L 512, batch 1 "
              f"(issue 2 quotes ~{REFERENCE_TOKENS_PER_S:.0f} tok/s for the reference)")
        compare(dict(kind="model", length=512, batch=1, d_model=128, n_layer=2, chunk=args.chunk), "",
                ["sequential", "reference_style"])

    if not args.skip_model and not args.lengths:
        print("\ncpu_demo size: PS d_model 128, 4 layers, L 1024, batch 8")
        for impl in OURS:
            demo = spawn(args, impl=impl, kind="model", length=1024, batch=8, d_model=128, n_layer=4, chunk=args.chunk)
            results.append(demo)
            print(f"  {impl:15s} {fmt(demo)} ({demo['wall_s']:.1f} s/step wall, {demo['cpu_s']:.1f} s cpu)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
