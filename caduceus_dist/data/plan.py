"""Print the data plan: which crops every rank trains on, without training.

    python -m caduceus_dist.data.plan --config recipes/cpu_demo.yaml --world-size 4 --steps 0:10 [key=value ...]

One JSON line per (step, data-parallel rank, micro-batch): the stage and seq_len, and per row the source
(genome) name, its global sample id, crop offset in the stored window, strand (0 = as stored, 1 = reverse
complement) and the source's epoch. With the recipe's engine.cp = C, --world-size processes form
world / C data-parallel ranks, and `cp_ranks` lists the C processes that split each of its rows.
Steps are 0-based data steps (step s is the s-th optimizer step of the run). Only the recipe's
`data:` section, `train.seed` / `train.grad_accum` and `engine.cp` are read; other sections are ignored.
Overrides use the recipe's key names (data.seq_len=4096, train.seed=7). The rows are computed by
the same code path that feeds training, so the plan is what training consumes (tests check it).

With --stats, one JSON line per curriculum stage in the steps instead: how diverse the steps' batches
are against independent uniform draws of crops from the split (docs/loading.md, "Batch diversity").
With --windows NAME=COUNTxLENGTH the plan is made for splits of that size without reading any shards
(e.g. hg38's 272k windows of 131,072 bases, before sharding it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import NamedTuple

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from caduceus_dist.data.config import DataConfig
from caduceus_dist.data.curriculum import DataPlanError
from caduceus_dist.data.loader import TrainStream
from caduceus_dist.shard_format import ShardFormatError


class Recipe(NamedTuple):
    data: DataConfig
    seed: int | None
    grad_accum: int
    cp: int  # engine.cp: consecutive ranks that share each sequence


def load_recipe(path: str | None, overrides: list[str]) -> Recipe:
    """The data-plan keys of a job recipe plus key=value overrides."""
    raw = OmegaConf.load(path) if path else OmegaConf.create({})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key=value (e.g. data.seq_len=4096)")
    raw = OmegaConf.merge(raw, OmegaConf.from_dotlist(overrides))
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), raw.get("data") or {})
    train = raw.get("train") or {}
    return Recipe(OmegaConf.to_object(data), train.get("seed"), int(train.get("grad_accum", 1)),
                  int((raw.get("engine") or {}).get("cp", 1)))


def plan_lines(stream: TrainStream, start: int, stop: int, cp: int = 1):
    """`rank` is the data-parallel rank; with engine.cp > 1, `cp_ranks` are the processes that share its rows
    (each takes seq_len / cp consecutive positions of every row)."""
    for step in range(start, stop):
        plan = stream.plan(step)
        for rank in range(stream.world_size):
            for micro in range(stream.grad_accum):
                rows = stream.rows(step, rank, micro)
                shared = {"cp_ranks": list(range(rank * cp, (rank + 1) * cp))} if cp > 1 else {}
                yield {"step": step, "rank": rank, **shared, "micro": micro, "stage": plan.stage, "seq_len": plan.seq_len,
                       "source": [stream.names[k] for k in rows.source.tolist()], "sample_id": rows.sample_id.tolist(), "crop_offset": rows.offset.tolist(),
                       "strand": rows.strand.tolist(), "epoch": rows.epoch.tolist()}


INDEPENDENT_FORMULAS = ("independent draws (each of n crops picks source k with probability w_k, then one of its W_k "
                        "windows): h_k = 1 - (1 - w_k / W_k)^n; distinct_independent = sum_k W_k h_k; "
                        "reuse_independent = sum_k W_k h_k^2 / sum_k W_k h_k")


def independent_expectations(windows: list[int], weights: list[float], rows: int) -> tuple[float, float]:
    """(distinct windows per step, fraction of a step's windows drawn again by the next step) when each of
    `rows` crops picks source k with probability weights[k], then one of its windows[k] windows uniformly,
    all independently. A window of source k is drawn at least once in a step with probability
    h_k = 1 - (1 - w_k / W_k)^R; distinct = sum_k W_k h_k; reuse = sum_k W_k h_k^2 / sum_k W_k h_k."""
    hits = [(count, 1.0 - (1.0 - weight / count) ** rows) for count, weight in zip(windows, weights, strict=True)]
    distinct = sum(count * hit for count, hit in hits)
    return distinct, sum(count * hit * hit for count, hit in hits) / distinct


def diversity_stats(stream: TrainStream, start: int, stop: int) -> list[dict]:
    """Per stage: mean distinct windows per step and mean reuse by the next step, ours against independent draws."""
    windows = [order.windows for order in stream.orders]
    by_stage: dict[int, dict] = {}
    previous: tuple[int, set[tuple[int, int]]] | None = None
    for step in range(start, stop):
        plan = stream.plan(step)
        drawn = set()
        rows = 0
        for rank in range(stream.world_size):
            for micro in range(stream.grad_accum):
                batch = stream.rows(step, rank, micro)
                drawn.update(zip(batch.source.tolist(), batch.sample_id.tolist(), strict=True))
                rows += len(batch.sample_id)
        stage = by_stage.setdefault(plan.stage, {"stage": plan.stage, "seq_len": plan.seq_len, "rows_per_step": rows,
                                                 "steps": 0, "distinct": 0, "reuse": [], "first_step": step,
                                                 "weights": stream.mixture.weights_at(step).tolist()})
        stage["steps"] += 1
        stage["distinct"] += len(drawn)
        if previous is not None and previous[0] == plan.stage:
            stage["reuse"].append(len(previous[1] & drawn) / len(previous[1]))
        previous = (plan.stage, drawn)
    lines = []
    for stage in by_stage.values():
        distinct, reuse = stage["distinct"] / stage["steps"], stage.pop("reuse")
        want_distinct, want_reuse = independent_expectations(windows, stage["weights"], stage["rows_per_step"])
        mean_reuse = sum(reuse) / len(reuse) if reuse else None
        lines.append({**{k: stage[k] for k in ("stage", "seq_len", "first_step", "steps", "rows_per_step")},
                      "windows_in_split": sum(windows), "distinct_windows": round(distinct, 2),
                      "distinct_independent": round(want_distinct, 2),
                      "distinct_ratio": round(distinct / want_distinct, 4),
                      "reuse_next_step": None if mean_reuse is None else round(mean_reuse, 4),
                      "reuse_independent": round(want_reuse, 4),
                      "reuse_ratio": None if mean_reuse is None else round(mean_reuse / want_reuse, 3)})
    return lines


def _steps(text: str) -> tuple[int, int]:
    start, sep, stop = text.partition(":")
    if not sep or not start.isdigit() or not stop.isdigit() or int(stop) <= int(start):
        raise argparse.ArgumentTypeError(f"--steps wants A:B with 0 <= A < B, got '{text}'")
    return int(start), int(stop)


def _windows(text: str) -> tuple[str, tuple[int, int]]:
    name, sep, sizes = text.partition("=")
    count, times, length = sizes.partition("x")
    if not sep or not times or not count.isdigit() or not length.isdigit() or int(count) < 1 or int(length) < 1:
        raise argparse.ArgumentTypeError(f"--windows wants NAME=COUNTxLENGTH (e.g. default=272000x131072), got '{text}'")
    return name, (int(count), int(length))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m caduceus_dist.data.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="job recipe YAML (its data: section is used)")
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=None, help="default: the recipe's train.grad_accum or 1")
    parser.add_argument("--steps", type=_steps, default=(0, 1), help="A:B, steps A..B-1 (default 0:1)")
    parser.add_argument("--stats", action="store_true",
                        help="per stage: distinct windows per step and reuse by the next step, vs independent draws")
    parser.add_argument("--windows", metavar="NAME=COUNTxLENGTH", action="append", type=_windows,
                        help="plan for splits that need not exist (repeat per source; one-source recipes use the "
                        "name 'default'), e.g. --windows default=272000x131072 for hg38 at 131k windows")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.seq_len=4096")
    args = parser.parse_args(argv)
    try:
        cfg, seed, grad_accum, cp = load_recipe(args.config, args.overrides)
        if args.world_size % cp:
            raise DataPlanError(f"--world-size {args.world_size} is not divisible by the recipe's engine.cp={cp}")
        topology = {"world_size": args.world_size // cp, "grad_accum": args.grad_accum or grad_accum, "train_seed": seed}
        if args.windows:
            stream = TrainStream.planned(cfg, dict(args.windows), **topology)
        else:
            stream = TrainStream(cfg, rank=0, **topology)
    except (OSError, ValueError, OmegaConfBaseException, ShardFormatError, DataPlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stats:
        print(INDEPENDENT_FORMULAS, file=sys.stderr)
    try:
        for line in diversity_stats(stream, *args.steps) if args.stats else plan_lines(stream, *args.steps, cp):
            print(json.dumps(line, separators=(",", ":")))
        sys.stdout.flush()
    except BrokenPipeError:  # `... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
