"""From shards to batches: `TrainStream` (training), `build_eval_loader` (validation/test), configs.

    from caduceus_dist.data import DataConfig, CurriculumConfig, TrainStream, build_eval_loader

See `loader.py` for the stream API and its guarantees, `cursor.py` for the data order,
`curriculum.py` for the sequence-length schedule, `masking.py` for the MLM corruption and
`shard_format.py` for the on-disk format.
"""

from caduceus_dist.data.config import CurriculumConfig, DataConfig, StageConfig
from caduceus_dist.data.curriculum import DataPlanError, StepPlan
from caduceus_dist.data.loader import EvalStream, StepBatch, TrainStream, build_eval_loader
from caduceus_dist.data.shard_format import ShardFormatError

__all__ = [
    "CurriculumConfig",
    "DataConfig",
    "DataPlanError",
    "EvalStream",
    "ShardFormatError",
    "StageConfig",
    "StepBatch",
    "StepPlan",
    "TrainStream",
    "build_eval_loader",
]
