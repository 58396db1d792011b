"""The `logging:` keys of a job."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoggingConfig:
    """`log_every`: report period in steps: the console line and TensorBoard's train/perf/data scalars
    (step 1 and the last step too). Only then are the step's figures reduced across ranks and read on
    the host, and throughput is measured over the steps since the previous report.
    `peak_flops_per_device`: denominator of MFU; 0 = the datasheet value of a known GPU, or on a
    CPU the stated peak threads x clock x FLOP/cycle (metrics.writer.cpu_peak_flops), printed at start.
    """

    log_every: int = 10
    tensorboard: bool = True
    peak_flops_per_device: float = 0.0
