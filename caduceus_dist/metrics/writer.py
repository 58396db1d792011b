"""Training metrics: one TensorBoard writer (rank 0) and a console line.

The trainer reduces every value across ranks before it gets here, so what rank 0 writes is what
every rank computed; nothing in this module talks to other processes.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import torch

from caduceus_dist.metrics.config import LoggingConfig

TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against the CUDA device name.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A6000": 155e12, "A5000": 111e12,
                  "L40": 181e12, "V100": 125e12, "4090": 165e12, "3090": 71e12}


def measure_cpu_flops(size: int = 512, repeats: int = 8) -> float:
    """Achievable fp32 matmul FLOP/s of this process's CPU threads (the MFU denominator on a CPU)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def peak_flops(cfg: LoggingConfig, device: torch.device) -> float:
    if cfg.peak_flops_per_device > 0:
        return cfg.peak_flops_per_device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
        raise ValueError(f"logging.peak_flops_per_device: unknown GPU '{name}'; set the peak FLOP/s explicitly")
    return measure_cpu_flops()


def peak_memory_gib(device: torch.device) -> float:
    """Peak accelerator memory allocated, or on a CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


class MetricsWriter:
    """Writes scalars to TensorBoard and prints console lines, on rank 0 only."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, rank: int):
        self.cfg = cfg
        self.active = rank == 0
        self.writer = None
        if self.active and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def print(self, line: str) -> None:
        if self.active:
            print(line, file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def train_line(step: int, max_steps: int, m: dict[str, float]) -> str:
    return (
        f"step {step:>6}/{max_steps} | loss {m['train/loss']:.4f} | acc {m['train/accuracy']:.3f}"
        f" | lr {m['train/lr']:.2e} | gnorm {m['train/grad_norm']:.3f}"
        f" | tok/s {m['perf/tokens_per_s']:,.0f} ({m['perf/tokens_per_s_per_device']:,.0f}/dev)"
        f" | mfu {100 * m['perf/mfu']:.2f}% | L {m['data/seq_len']:.0f} stage {m['data/stage']:.0f}"
        f" | mem {m['perf/peak_memory_gib']:.2f} GiB | {1000 * m['perf/step_time_s']:.0f} ms/step"
        f" | data wait {100 * m['perf/data_wait_fraction']:.1f}% | tokens {m['data/consumed_tokens']:,.0f}"
    )


def eval_line(step: int, m: dict[str, float]) -> str:
    return (
        f"eval {step:>6} | loss {m['val/loss']:.4f} | ppl {m['val/perplexity']:.3f}"
        f" | bits/base {m['val/bits_per_base']:.4f} | acc {m['val/accuracy']:.3f} | targets {m['val/n_targets']:,.0f}"
    )
