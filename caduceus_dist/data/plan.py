"""Print the data plan: which crops every rank trains on, without training.

    python -m caduceus_dist.data.plan --config recipes/cpu_demo.yaml --world-size 4 --steps 0:10 [key=value ...]

One JSON line per (step, rank, micro-batch): the stage and seq_len, and per row the global sample
id, crop offset in the stored window, strand (0 = as stored, 1 = reverse complement) and epoch.
Steps are 0-based data steps (step s is the s-th optimizer step of the run). Only the recipe's
`data:` section and `train.seed` / `train.grad_accum` are read; other sections are ignored.
Overrides use the recipe's key names (data.seq_len=4096, train.seed=7). The rows are computed by
the same code path that feeds training, so the plan is what training consumes (tests check it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from caduceus_dist.data.config import DataConfig
from caduceus_dist.data.curriculum import DataPlanError
from caduceus_dist.data.loader import TrainStream
from caduceus_dist.shard_format import ShardFormatError


def load_recipe(path: str | None, overrides: list[str]) -> tuple[DataConfig, int | None, int]:
    """(DataConfig, train.seed, train.grad_accum) from a job recipe plus key=value overrides."""
    raw = OmegaConf.load(path) if path else OmegaConf.create({})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key=value (e.g. data.seq_len=4096)")
    raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(overrides))
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), raw.get("data") or {})
    train = raw.get("train") or {}
    return OmegaConf.to_object(data), train.get("seed"), int(train.get("grad_accum", 1))


def plan_lines(stream: TrainStream, start: int, stop: int):
    for step in range(start, stop):
        plan = stream.plan(step)
        for rank in range(stream.world_size):
            for micro in range(stream.grad_accum):
                rows = stream.rows(step, rank, micro)
                yield {"step": step, "rank": rank, "micro": micro, "stage": plan.stage, "seq_len": plan.seq_len,
                       "sample_id": rows.sample_id.tolist(), "crop_offset": rows.offset.tolist(),
                       "strand": rows.strand.tolist(), "epoch": rows.epoch.tolist()}


def _steps(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(stop) <= int(start):
        raise argparse.ArgumentTypeError(f"--steps wants A:B with 0 <= A < B, got '{text}'")
    return int(start), int(stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m caduceus_dist.data.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="job recipe YAML (its data: section is used)")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=None, help="default: the recipe's train.grad_accum or 1")
    parser.add_argument("--steps", type=_steps, default=(0, 1), help="A:B, steps A..B-1 (default 0:1)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_len=4096")
    args = parser.parse_args(argv)
    try:
        cfg, seed, grad_accum = load_recipe(args.config, args.overrides)
        stream = TrainStream(cfg, rank=0, world_size=args.world_size, grad_accum=args.grad_accum or grad_accum,
                             train_seed=seed)
    except (OSError, ValueError, OmegaConfBaseException, ShardFormatError, DataPlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        for line in plan_lines(stream, *args.steps):
            print(json.dumps(line, separators=(",", ":")))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
