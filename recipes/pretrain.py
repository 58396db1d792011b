"""Pretrain a Caduceus model. One entry point for every launcher:

    python recipes/pretrain.py --config recipes/cpu_demo.yaml
    torchrun --nproc_per_node N recipes/pretrain.py --config recipes/ps_131k.yaml engine.name=fsdp2
    deepspeed --num_gpus N recipes/pretrain.py --config recipes/ps_131k.yaml [key=value ...]

Exit codes: 0 done (or already finished); 2 the run cannot start or continue with what it was given
(config, shards, checkpoint, run_dir): the one-line message says what to fix; 75 preempted, checkpoint
saved, requeue me; 130 stopped with Ctrl-C; 1 a failure while running (a traceback follows; rerun to
resume from the last checkpoint). --debug adds the traceback to the one-line errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from caduceus_dist.errors import (
    EXIT_CONFIG_ERROR,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_PREEMPTED,
    ConfigError,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. recipes/cpu_demo.yaml")
    parser.add_argument("--debug", action="store_true", help="print the traceback of configuration and data errors too")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 engine.name=fsdp2")
    return parser.parse_args(argv)


def user_message(err: BaseException) -> str:
    """The error's own message; for one re-raised from a DataLoader worker, without the worker's traceback."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last and type(err).__name__ in last.split(": ", 1)[0] else last
    return text


def main(argv: list[str] | None = None) -> int:
    from caduceus_dist.checkpoint.manager import CheckpointSavesKeepFailing, CheckpointWriteError
    from caduceus_dist.checkpoint.restore import CheckpointError
    from caduceus_dist.config import load_job_config
    from caduceus_dist.prep.collection import ensure_sample_data
    from caduceus_dist.shard_format import ShardFormatError
    from caduceus_dist.train.trainer import Trainer

    args = parse_args(argv)
    # INFO (checkpoint saves, resumes, fallbacks) from rank 0 only; warnings from every rank.
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    cannot_start = {ConfigError: "config error", ShardFormatError: "data error", CheckpointError: "resume error"}
    try:
        cfg = load_job_config(args.config, args.overrides)
        return Trainer(cfg, prepare_data=lambda data: ensure_sample_data([s.shards for s in data.sources] or [data.shards])).run()
    except tuple(cannot_start) as err:
        label = next(text for kind, text in cannot_start.items() if isinstance(err, kind))
        print(f"{label}: {user_message(err)}", file=sys.stderr, flush=True)
        if args.debug:
            traceback.print_exc()
        return EXIT_CONFIG_ERROR
    except CheckpointSavesKeepFailing as err:  # training on without checkpoints would waste the allocation
        print(f"checkpoint write failed: {err}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except CheckpointWriteError as err:
        print(f"checkpoint write failed: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILURE


if __name__ == "__main__":
    from caduceus_dist.distributed import exit_process

    try:
        exit_code = main()
    except KeyboardInterrupt:
        print("stopped at once (Ctrl-C): nothing saved since the last checkpoint; run the same command again to "
              "resume from it", file=sys.stderr, flush=True)
        exit_code = EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        exit_code = EXIT_FAILURE
    exit_process(exit_code)
