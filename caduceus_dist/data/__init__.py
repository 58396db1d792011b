"""From shards to batches: `TrainStream` (training), `build_eval_loader` (validation/test), configs.

    from caduceus_dist.data import DataConfig, CurriculumConfig, TrainStream, build_eval_loader

See `loader.py` for the stream API and its guarantees, `cursor.py` for the data order,
`curriculum.py` for the sequence-length schedule, `masking.py` for the MLM corruption and
`shard_format.py` for the on-disk format. Names resolve lazily (PEP 562) so that the sharder,
which imports `caduceus_dist.data.fasta` etc., never pays for importing torch.
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
    "build_eval_loader": "loader",
    "ShardFormatError": "shard_format",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
