"""The `logging:` keys of a job."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoggingConfig:
    """`log_every`: console line period in steps (TensorBoard gets every step).
    `peak_flops_per_device`: denominator of MFU; 0 = the datasheet value of a known GPU, or on a
    CPU the stated peak threads x clock x FLOP/cycle (metrics.writer.cpu_peak_flops), printed at start.
    """

    log_every: int = 10
    tensorboard: bool = True
    peak_flops_per_device: float = 0.0
