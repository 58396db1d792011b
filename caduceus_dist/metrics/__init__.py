"""Training metrics: TensorBoard scalars and console lines written by rank 0, and the MFU denominator.

    config.py   LoggingConfig (the `logging:` keys; no torch)
    writer.py   MetricsWriter, console line formats, peak FLOP/s and peak memory
"""

from caduceus_dist.lazy import lazy_exports

_EXPORTS = {
    "LoggingConfig": "config",
    "MetricsWriter": "writer",
    "eval_line": "writer",
    "train_line": "writer",
    "peak_flops": "writer",
    "peak_memory_gib": "writer",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
