"""Pretrain a Caduceus model. One entry point for every launcher:

    python recipes/pretrain.py --config recipes/cpu_demo.yaml
    torchrun --nproc_per_node N recipes/pretrain.py --config recipes/ps_131k.yaml engine.name=fsdp2
    deepspeed --num_gpus N recipes/pretrain.py --config recipes/ps_131k.yaml [key=value ...]

Exit codes: 0 done; 2 bad config (message names the key); 75 preempted, checkpoint saved, requeue
me; anything else is a real failure that must not be requeued.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from caduceus_dist.errors import EXIT_CONFIG_ERROR, EXIT_FAILURE, ConfigError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. recipes/cpu_demo.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 engine.name=fsdp2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from caduceus_dist.checkpoint.manager import CheckpointWriteError
    from caduceus_dist.config import load_job_config
    from caduceus_dist.prep.sharding import ensure_sample_shards
    from caduceus_dist.shard_format import ShardFormatError
    from caduceus_dist.train.trainer import Trainer

    args = parse_args(argv)
    # INFO (checkpoint saves, resumes, fallbacks) from rank 0 only; warnings from every rank.
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        cfg = load_job_config(args.config, args.overrides)
        trainer = Trainer(cfg, prepare_data=lambda data: ensure_sample_shards(data.shards))
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG_ERROR
    except ShardFormatError as err:  # missing / corrupt shards: the message names the file
        print(f"data error: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    try:
        return trainer.run()
    except CheckpointWriteError as err:
        print(f"checkpoint write failed: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILURE


if __name__ == "__main__":
    from caduceus_dist.distributed import exit_process

    try:
        exit_code = main()
    except Exception:
        traceback.print_exc()
        exit_code = EXIT_FAILURE
    exit_process(exit_code)
