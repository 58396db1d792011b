"""Training metrics: one TensorBoard writer (rank 0) and a console line.

The trainer reduces every value across ranks before it gets here, so what rank 0 writes is what
every rank computed; nothing in this module talks to other processes.
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
import sys
from pathlib import Path

import torch

from caduceus_dist.metrics.config import LoggingConfig

TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against a whole word of the CUDA device
# name (so an L40S is not taken for an L40).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A6000": 155e12, "A5000": 111e12,
                  "L40": 181e12, "V100": 125e12, "4090": 165e12, "3090": 71e12}


def cpu_peak_flops(threads: int, cpuinfo: str | None = None) -> tuple[float, str]:
    """A stated fp32 peak for `threads` CPU threads: threads x clock x FLOP per cycle.

    32 FLOP per cycle for CPUs with AVX2 and FMA (two 8-wide FMA units), 8 otherwise; the clock is the
    highest the kernel reports. A stated figure, not a probe: a probe taken while other jobs run reads
    low and inflates MFU past 100%. Set logging.peak_flops_per_device for another figure.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags, mhz = set(), 0.0
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz":
            mhz = max(mhz, float(value or 0))
    with contextlib.suppress(OSError, ValueError):
        mhz = max(mhz, int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000)
    ghz = mhz / 1000 or 2.0  # no clock reported: assume 2 GHz, and say so
    per_cycle = 32 if {"avx2", "fma"} <= flags else 8
    clock = f"{ghz:.2f} GHz" if mhz else "2.00 GHz (assumed: no clock reported)"
    return threads * ghz * 1e9 * per_cycle, f"{threads} thread(s) x {clock} x {per_cycle} fp32 FLOP/cycle"


def gpu_peak_flops(name: str) -> tuple[float | None, str]:
    """The datasheet peak of the GPU called `name` (torch.cuda.get_device_name), or None if it is not known."""
    words = set(re.split(r"[\s\-_/]+", name.upper()))
    for key, value in GPU_PEAK_FLOPS.items():
        if key in words:
            return value, f"{key} dense bf16 datasheet"
    return None, f"unknown GPU '{name}': MFU not reported (set logging.peak_flops_per_device to get it)"


def peak_flops(cfg: LoggingConfig, device: torch.device) -> tuple[float | None, str]:
    """The MFU denominator per device (None: not known, MFU is not reported), and how it was obtained."""
    if cfg.peak_flops_per_device > 0:
        return cfg.peak_flops_per_device, "logging.peak_flops_per_device"
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device))
    return cpu_peak_flops(torch.get_num_threads())


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


def _mfu(m: dict[str, float]) -> str:
    return f"{100 * m['perf/mfu']:.2f}%" if "perf/mfu" in m else "n/a"


def train_line(step: int, max_steps: int, m: dict[str, float]) -> str:
    return (
        f"step {step:>6}/{max_steps} | loss {m['train/loss']:.4f} | acc {m['train/accuracy']:.3f}"
        f" | lr {m['train/lr']:.2e} | gnorm {m['train/grad_norm']:.3f}"
        f" | tok/s {m['perf/tokens_per_s']:,.0f} ({m['perf/tokens_per_s_per_device']:,.0f}/dev)"
        f" | mfu {_mfu(m)}"
        f" | L {m['data/seq_len']:.0f} stage {m['data/stage']:.0f}"
        f" | mem {m['perf/peak_memory_gib']:.2f} GiB | {1000 * m['perf/step_time_s']:.0f} ms/step"
        f" | data wait {100 * m['perf/data_wait_fraction']:.1f}% | tokens {m['data/consumed_tokens']:,.0f}"
    )


def eval_metrics(prefix: str, sums: dict[str, float]) -> dict[str, float]:
    """Validation figures from evaluation sums (loss.EVAL_SUMS): loss, perplexity, bits per base and
    accuracy over every target, and loss and bits per base over upper-case (not soft-masked) bases."""
    return _validation_figures(prefix, sums["loss_sum"] / max(sums["n_targets"], 1.0),
                               sums["n_correct"] / max(sums["n_targets"], 1.0), sums["n_targets"],
                               sums["upper_loss_sum"] / max(sums["upper_targets"], 1.0))


def mixture_metrics(prefix: str, metrics: dict[str, float], names: tuple[str, ...],
                    weights: dict[str, float]) -> dict[str, float]:
    """The mixture's total from each source's figures (`{prefix}/{name}/...` in `metrics`): loss and accuracy
    weighted by the sources' current weights (renormalised over `names`; equal if all are 0), targets summed."""
    total = sum(weights.get(name, 0.0) for name in names)
    share = {name: weights.get(name, 0.0) / total if total > 0 else 1 / len(names) for name in names}

    def mean(key: str) -> float:
        return sum(share[name] * metrics[f"{prefix}/{name}/{key}"] for name in names)

    return _validation_figures(prefix, mean("loss"), mean("accuracy"),
                               sum(metrics[f"{prefix}/{name}/n_targets"] for name in names), mean("loss_uppercase"))


def _validation_figures(prefix: str, loss: float, accuracy: float, n_targets: float, upper: float) -> dict[str, float]:
    return {f"{prefix}/loss": loss, f"{prefix}/perplexity": math.exp(loss), f"{prefix}/bits_per_base": loss / math.log(2),
            f"{prefix}/accuracy": accuracy, f"{prefix}/n_targets": n_targets,
            f"{prefix}/loss_uppercase": upper, f"{prefix}/bits_per_base_uppercase": upper / math.log(2)}


def eval_line(step: int, m: dict[str, float], sources: tuple[str, ...] = ()) -> str:
    """The console line of an evaluation; with several sources, each source's bits per base follow."""
    line = (
        f"eval {step:>6} | loss {m['val/loss']:.4f} | ppl {m['val/perplexity']:.3f}"
        f" | bits/base {m['val/bits_per_base']:.4f} (upper-case {m['val/bits_per_base_uppercase']:.4f})"
        f" | acc {m['val/accuracy']:.3f} | targets {m['val/n_targets']:,.0f}"
    )
    return line + "".join(f" | {name} {m[f'val/{name}/bits_per_base']:.4f}" for name in sources)
