"""From shards to batches: `TrainStream` (training), `build_eval_loader` (validation/test), configs.

    from caduceus_dist.data import DataConfig, CurriculumConfig, TrainStream, build_eval_loader

See `loader.py` for the stream API and its guarantees, `cursor.py` for the data order,
`curriculum.py` for the sequence-length schedule, `masking.py` for the MLM corruption and
`caduceus_dist.shard_format` for the on-disk format (docs/shard-format.md). Names resolve lazily
(PEP 562), so reading a `DataConfig` does not import torch.
"""

from caduceus_dist.lazy import lazy_exports

_EXPORTS = {
    "CurriculumConfig": "config",
    "DataConfig": "config",
    "StageConfig": "config",
    "DataPlanError": "curriculum",
    "StepPlan": "curriculum",
    "EvalStream": "loader",
    "StepBatch": "loader",
    "TrainStream": "loader",
    "SequenceSlice": "loader",
    "build_eval_loader": "loader",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
