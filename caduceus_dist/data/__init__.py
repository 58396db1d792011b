"""From shards to batches: `TrainStream` (training), `build_eval_loader` (validation/test), configs.

    from caduceus_dist.data import DataConfig, CurriculumConfig, TrainStream, build_eval_loader

See `loader.py` for the stream API and its guarantees, `cursor.py` for the data order,
`curriculum.py` for the sequence-length schedule, `masking.py` for the MLM corruption and
`shard_format.py` for the on-disk format. Names resolve lazily (PEP 562) so that the sharder,
which imports `caduceus_dist.data.fasta` etc., never pays for importing torch.
"""

from importlib import import_module

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


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
