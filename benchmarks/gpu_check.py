"""The measurements of benchmarks/gpu_check.sh: bf16 training steps, throughput, MFU, memory, checkpoint.

    python benchmarks/gpu_check.py [--device cuda] [--sizes ps_1k ps_131k] [--steps 6] [--out DIR]
    python benchmarks/gpu_check.py --device cpu --smoke      # the CPU rehearsal the test suite runs

For each size it builds the recipe's model with the DDP engine (one process), bf16 autocast, the
kernel backend the machine has (`cuda` = mamba-ssm kernels if they import, else the pure-PyTorch
scan on the GPU; stated in the output), times `--steps` optimizer steps after two warm-up steps and
reports tokens/s, MFU against the GPU's datasheet peak and peak memory. The pure-PyTorch backend is
the in-run baseline: where the kernels are present both are measured and the ratio is printed. It
then saves a checkpoint through CheckpointManager, restores it into a fresh engine and checks that
the restored weights are bitwise the saved ones. Each measurement that fails (out of memory, a
missing kernel) is reported as such and the others go on. Results: a table on stdout and
`gpu_check.json` in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from caduceus_dist.checkpoint import CheckpointManager  # noqa: E402
from caduceus_dist.config import load_job_config  # noqa: E402
from caduceus_dist.distributed import DistContext  # noqa: E402
from caduceus_dist.engine import build_engine  # noqa: E402
from caduceus_dist.metrics.writer import gpu_peak_flops, peak_memory_gib  # noqa: E402
from caduceus_dist.model import CaduceusForMaskedLM, flops_per_token  # noqa: E402

# size -> (recipe, sequence length, sequences per step); the recipes' own lengths
SIZES = {"ps_1k": ("ps_1k.yaml", 1024, 32), "ps_131k": ("ps_131k.yaml", 131072, 1)}
SMOKE = ["model.d_model=16", "model.n_layer=1"]  # --smoke: a tiny model at a short length, on any device


def kernel_backends(device: torch.device) -> list[str]:
    """The backends to measure: the CUDA kernels where mamba-ssm imports (then also the PyTorch scan
    as the baseline), else the PyTorch scan alone."""
    if device.type != "cuda":
        return ["auto"]
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        return ["torch"]
    return ["cuda", "torch"]


def measure(size: str, backend: str, device: torch.device, steps: int, smoke: bool) -> dict:
    recipe, seq_len, batch = SIZES[size]
    if smoke:
        seq_len, batch = 256, 2
    overrides = ["engine.name=ddp", f"engine.device={device.type}", "engine.precision=bf16",
                 f"model.backend={backend}", "checkpoint.every=1", *(SMOKE if smoke else [])]
    cfg = load_job_config(REPO / "recipes" / recipe, overrides)
    torch.manual_seed(0)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=device)
    engine = build_engine(cfg, CaduceusForMaskedLM(cfg.model), ctx, micro_batch=batch)
    ids = torch.randint(7, 11, (batch, seq_len))
    batches = [{"input_ids": ids, "targets": torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, 4))}]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):  # warm-up: allocator, autotuning, AdamW moments
        engine.train_step(batches, lr=1e-4).reduce()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        figures = engine.train_step(batches, lr=1e-4).reduce()  # reading the loss waits for the device
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = batch * seq_len / step_s
    peak, peak_source = gpu_peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else (None, "")
    result = {
        "size": size, "backend": backend, "seq_len": seq_len, "batch": batch, "step_s": step_s,
        "tokens_per_s": tokens_per_s, "loss": figures["loss"], "peak_memory_gib": peak_memory_gib(device),
        "mfu": flops_per_token(cfg.model, seq_len) * tokens_per_s / peak if peak else None,
        "peak_flops": peak, "peak_source": peak_source,
        "params": sum(p.numel() for p in engine.module.parameters()),
    }
    result.update(checkpoint_round_trip(cfg, engine, ctx, batch))
    return result


def checkpoint_round_trip(cfg, engine, ctx: DistContext, batch: int) -> dict:
    """Save through the manager, restore into a fresh engine, compare the weights bitwise."""
    with tempfile.TemporaryDirectory() as tmp:
        manager = CheckpointManager(cfg, tmp, engine)
        start = time.perf_counter()
        manager.save(1, {"step": 1})
        save_s = time.perf_counter() - start
        manager.close()
        torch.manual_seed(1)  # different initial weights: only the restore can make them equal
        fresh = build_engine(cfg, CaduceusForMaskedLM(cfg.model), ctx, micro_batch=batch)
        restorer = CheckpointManager(cfg, tmp, fresh)
        start = time.perf_counter()
        restorer.resume()
        restore_s = time.perf_counter() - start
        restorer.close()
    saved, restored = engine.full_state_dict(), fresh.full_state_dict()
    equal = saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    return {"checkpoint_save_s": save_s, "checkpoint_restore_s": restore_s, "checkpoint_bitwise_equal": equal}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--smoke", action="store_true", help="a tiny model at L 256 (a rehearsal on any device)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine (or --device cpu --smoke)", file=sys.stderr)
        return 2
    dist.init_process_group("gloo" if device.type == "cpu" else "nccl", store=dist.HashStore(), rank=0,
                            world_size=1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}: torch {torch.__version__}, backends {kernel_backends(device)}", flush=True)
    results = []
    for size in args.sizes:
        for backend in kernel_backends(device):
            try:
                results.append(measure(size, backend, device, args.steps, args.smoke))
            except Exception as err:  # one failed measurement must not hide the others
                traceback.print_exc()
                results.append({"size": size, "backend": backend, "error": f"{type(err).__name__}: {err}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps(results[-1]), flush=True)
    print(f"\n{'size':8} {'backend':8} {'L':>7} {'batch':>5} {'tok/s':>12} {'MFU':>7} {'mem GiB':>8} "
          f"{'save s':>7} {'restore s':>9} bitwise")
    for r in results:
        if "error" in r:
            print(f"{r['size']:8} {r['backend']:8} failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"{r['size']:8} {r['backend']:8} {r['seq_len']:>7} {r['batch']:>5} {r['tokens_per_s']:>12,.0f} "
              f"{mfu:>7} {r['peak_memory_gib']:>8.2f} {r['checkpoint_save_s']:>7.2f} {r['checkpoint_restore_s']:>9.2f} "
              f"{r['checkpoint_bitwise_equal']}")
    for size in args.sizes:
        rates = {r["backend"]: r["tokens_per_s"] for r in results if r["size"] == size and "error" not in r}
        if "cuda" in rates and "torch" in rates:
            print(f"ratio {size}: mamba-ssm kernels / PyTorch scan = {rates['cuda'] / rates['torch']:.2f}x")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                              "results": results}, indent=1))
    dist.destroy_process_group()
    failed = [r for r in results if "error" in r or not r["checkpoint_bitwise_equal"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
