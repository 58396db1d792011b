"""Checkpoint cost at the ps_131k model size (d_model 256, 16 layers, AdamW) on CPU, one process.

    .venv/bin/python benchmarks/bench_checkpoint.py [--seq-len 1024] [--batch 1] [--repeats 3]

Measures, in one run: the bytes of a checkpoint; CheckpointManager save seconds (synchronous), and the
time training is blocked by an asynchronous save (plus its total time in the background); restore
seconds (verify every sha256 + load); the time of one training step at a CPU-feasible length (stated);
and a baseline: a bare `torch.save` of model + optimizer state with no atomicity, checksums or fsync.
Prints the ratios save/step and ours/baseline.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from caduceus_dist.checkpoint import CheckpointManager
from caduceus_dist.config import load_job_config
from caduceus_dist.distributed import DistContext
from caduceus_dist.engine import build_engine
from caduceus_dist.model import CaduceusForMaskedLM

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ps_131k.yaml"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence of the timed step")
    parser.add_argument("--batch", type=int, default=1, help="sequences in the timed step")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    cfg = load_job_config(RECIPE, ["engine.name=ddp", "engine.precision=fp32", "engine.device=cpu",
                                   "model.gradient_checkpointing=false", "checkpoint.every=1"])
    torch.manual_seed(0)
    engine = build_engine(cfg, CaduceusForMaskedLM(cfg.model), DistContext(0, 1, 0, torch.device("cpu")))
    n_params = sum(p.numel() for p in engine.module.parameters())
    ids = torch.randint(7, 11, (args.batch, args.seq_len))
    batch = {"input_ids": ids, "targets": torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, 4))}
    engine.train_step([batch], lr=1e-3)  # warm-up; also creates the AdamW moments that a checkpoint holds
    step_s = statistics.median(timed(lambda: engine.train_step([batch], lr=1e-3)) for _ in range(args.repeats))

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        baseline = []
        for i in range(args.repeats):
            path = tmp / f"bare_{i}.pt"
            baseline.append(timed(lambda path=path: torch.save(
                {"model": engine.module.state_dict(), "optim": engine.optimizer.state_dict()}, path)))
        baseline_s = statistics.median(baseline)

        sync = CheckpointManager(cfg, tmp / "sync", engine)
        sync_s = statistics.median(timed(lambda i=i: sync.save(i + 1, {"step": i + 1})) for i in range(args.repeats))
        nbytes = int(sync.stats()["checkpoint/bytes"])
        sync.close()

        cfg.checkpoint.async_save = True
        asynchronous = CheckpointManager(cfg, tmp / "async", engine)
        blocking, total = [], []
        for i in range(args.repeats):
            blocking.append(timed(lambda i=i: asynchronous.save(i + 1, {"step": i + 1})))
            asynchronous.wait()
            total.append(asynchronous.stats()["checkpoint/save_s"])
        asynchronous.close()

        cfg.checkpoint.async_save = False
        restores = []
        for _ in range(args.repeats):
            manager = CheckpointManager(cfg, tmp / "sync", engine)
            restores.append(timed(manager.resume))
            manager.close()
        restore_s = statistics.median(restores)
    block_s, async_total_s = statistics.median(blocking), statistics.median(total)
    print(f"model: ps_131k size, {n_params:,} params, fp32 + AdamW (ddp engine, 1 process, "
          f"{torch.get_num_threads()} threads)")
    print(f"checkpoint: {nbytes / 1e6:.1f} MB")
    print(f"train step (batch {args.batch} x L {args.seq_len}, fwd+bwd+AdamW): {step_s:.3f} s")
    print(f"bare torch.save baseline (no atomicity/checksums/fsync): {baseline_s:.3f} s")
    print(f"sync save (tmp dir, sha256, fsync, manifest, rename, latest): {sync_s:.3f} s")
    print(f"async save: training blocked {block_s:.3f} s; written in the background in {async_total_s:.3f} s")
    print(f"restore (verify every sha256 + load + RNG): {restore_s:.3f} s")
    print(f"ratio sync save / train step: {sync_s / step_s:.2f}")
    print(f"ratio async blocking / train step: {block_s / step_s:.2f}")
    print(f"ratio sync save / bare torch.save: {sync_s / baseline_s:.2f}")
    print(f"ratio async blocking / bare torch.save: {block_s / baseline_s:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
