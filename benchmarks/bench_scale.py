"""The scale model: how every per-rank cost grows with the number of ranks, measured, fitted, projected.

    .venv/bin/python benchmarks/bench_scale.py [--ranks 1 2 4 8] [--pfs-gbps 20] [--node-gbps 2]

For each rank count it starts that many real processes (gloo on this machine, one thread each) that
each measure, at the ps_131k model size (7.7 M parameters, DDP, fp32 AdamW state):

  config       loading and validating the recipe
  verify       sha256 verification of the shards, split among ranks by bytes (data.verify=sha256),
               and the same start with the verified-stamp cache (only sizes and mtimes are read)
  model        building the model (CPU seconds)
  engine       wrapping it in the engine (DDP broadcasts rank 0's weights to every rank)
  agree        one preemption agreement (the per-step all-reduce of two integers), median of 200
  save         a synchronous checkpoint save; `async_block`: training blocked by an asynchronous one
  restore      selecting, verifying and loading the newest checkpoint
  eval         16 sequences of 1,024 tokens split among the ranks, forward, one all-reduce
  loader       CPU time of one training step's batches (65,536 tokens per step in all)

The slowest rank decides each figure. Work that a rank does alone is timed in CPU seconds (this
machine has 2 cores, so 8 processes share them and wall time would count the sharing); collectives
and I/O in wall seconds. Each cost is fitted as c(n) = a + b n over the measured n, its log-log
growth exponent from 2 ranks (the first with collectives) to the largest n is printed, and a cost
that grows faster than linearly in ranks (exponent > 1.1) is flagged. The dataset is a seeded
random genome (`--genome-mbp`, 400 by default) sharded like a real one. The same fits, with stated file-system bandwidths,
project ps_131k on hg38 (272k windows of 131,072, ~10 GB of shards) to 8, 64 and 512 GPUs.
The baseline in the same run is the 1-rank figure of each cost (the ratio column).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "ps_131k.yaml"
EVAL_SEQUENCES, EVAL_LEN, STEP_TOKENS = 16, 1024, 65536
# hg38 at ps_131k (docs/data-prep.md): 272k windows of 131,072 bases; shard bytes after zstd
HG38_SHARD_BYTES, HG38_SHARDS, HG38_STEP_TOKENS = 10e9, 2720, 1048576
COSTS = {  # name -> (how it is timed, what it grows with)
    "config": ("cpu", "nothing"), "verify": ("cpu", "bytes/rank"), "verify_cached": ("cpu", "shards/rank"),
    "model": ("cpu", "params"), "engine": ("wall", "params x ranks"), "agree": ("wall", "ranks"), "save": ("wall", "bytes"),
    "async_block": ("wall", "bytes"), "restore": ("wall", "bytes"), "eval": ("cpu", "work/rank"),
    "loader": ("cpu", "tokens/rank"),
}


def _timed(fn, clock=time.perf_counter):
    start = clock()
    value = fn()
    return clock() - start, value


def worker(shards: str, run_dir: str) -> dict:
    """One rank's measurements (see the module docstring)."""
    import torch
    import torch.distributed as dist

    from caduceus_dist.checkpoint import CheckpointManager
    from caduceus_dist.config import load_job_config
    from caduceus_dist.data import TrainStream
    from caduceus_dist.data.dataset import ShardSplit
    from caduceus_dist.distributed import all_reduce, barrier, init_distributed
    from caduceus_dist.engine import build_engine
    from caduceus_dist.model import CaduceusForMaskedLM

    torch.set_num_threads(1)
    out: dict[str, float] = {}
    overrides = ["engine.name=ddp", "engine.device=cpu", "engine.precision=fp32", "model.gradient_checkpointing=false",
                 f"data.shards={shards}", "data.seq_len=1024", f"data.tokens_per_step={STEP_TOKENS}",
                 "data.curriculum={}", "data.num_workers=0", "data.verify=sha256", "checkpoint.keep=0"]
    out["config"], cfg = _timed(lambda: load_job_config(RECIPE, overrides), time.process_time)
    ctx = init_distributed("cpu")
    barrier()
    out["verify"], _ = _timed(lambda: ShardSplit(shards, "train", verify="sha256", use_stamps=False),
                              time.process_time)
    ShardSplit(shards, "train", verify="sha256")  # writes the stamp
    barrier()
    out["verify_cached"], _ = _timed(lambda: ShardSplit(shards, "train", verify="sha256"), time.process_time)
    barrier()
    torch.manual_seed(0)
    out["model"], model = _timed(lambda: CaduceusForMaskedLM(cfg.model), time.process_time)
    barrier()
    out["engine"], engine = _timed(lambda: build_engine(cfg, model, ctx, micro_batch=1))
    agreements = []
    for _ in range(200):
        agreements.append(_timed(lambda: all_reduce([0, 1], ctx.device, op="max", dtype=torch.int64))[0])
    out["agree"] = statistics.median(agreements)

    ids = torch.randint(7, 11, (1, EVAL_LEN))
    batch = {"input_ids": ids, "targets": torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, 4))}
    engine.train_step([batch], lr=1e-4).reduce()  # AdamW moments exist: a checkpoint holds them
    barrier()
    manager = CheckpointManager(cfg, run_dir, engine)
    out["save"], _ = _timed(lambda: manager.save(1, {"step": 1}))
    out["bytes"] = manager.stats()["checkpoint/bytes"]
    manager.close()
    cfg.checkpoint.async_save, cfg.checkpoint.async_staging_dir = True, str(Path(run_dir) / "staging")
    manager = CheckpointManager(cfg, run_dir, engine)
    out["async_block"], _ = _timed(lambda: manager.save(2, {"step": 2}))
    manager.close()
    cfg.checkpoint.async_save = False
    manager = CheckpointManager(cfg, run_dir, engine)
    out["restore"], _ = _timed(manager.resume)
    manager.close()

    mine = range(ctx.rank, EVAL_SEQUENCES, ctx.world_size)

    def evaluate():
        total = 0.0
        for _ in mine:
            total += engine.eval_step(batch)["loss_sum"]
        return all_reduce([total], ctx.device)

    barrier()
    out["eval"], _ = _timed(evaluate, time.process_time)
    stream = TrainStream(cfg.data, ctx.rank, ctx.world_size, 1, train_seed=1)
    steps = stream.iterate(0)
    next(steps)  # opens the shards
    loader = [_timed(lambda: next(steps), time.process_time)[0] for _ in range(4)]
    steps.close()
    out["loader"] = statistics.median(loader)
    dist.destroy_process_group()
    return out


def random_genome(path: Path, mbp: int, contig_mbp: int = 10) -> Path:
    """A seeded random ACGT genome (zstd stores it at about 2 bits a base, like real shards)."""
    import numpy as np

    rng = np.random.default_rng(0)
    with open(path, "w") as fasta:
        for contig in range(max(1, mbp // contig_mbp)):
            bases = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, contig_mbp * 1_000_000)]
            fasta.write(f">chr{contig + 1}\n")
            fasta.write(bases.tobytes().decode())
            fasta.write("\n")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(n: int, shards: str, work: Path) -> dict[str, float]:
    """The slowest rank's figure of each cost at `n` ranks."""
    run_dir = work / f"run_{n}"
    env = {**os.environ, "WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", shards, str(run_dir)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in range(n)]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    reports = [json.loads(line[7:]) for out in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    if len(reports) != n:
        raise SystemExit(f"bench_scale: {n - len(reports)} of {n} ranks failed:\n" + "\n".join(outputs))
    return {key: max(report[key] for report in reports) for key in reports[0]}


def fit(ns: list[int], values: list[float]) -> tuple[float, float, float]:
    """(a, b, exponent): least squares c = a + b n, and the log-log slope from the first n with other
    ranks (2; one rank has no collectives to pay for) to the last."""
    mean_n, mean_v = statistics.fmean(ns), statistics.fmean(values)
    var = sum((n - mean_n) ** 2 for n in ns)
    b = sum((n - mean_n) * (v - mean_v) for n, v in zip(ns, values, strict=True)) / var if var else 0.0
    a = mean_v - b * mean_n
    first = 1 if ns[0] == 1 and len(ns) > 2 else 0
    exponent = (math.log(max(values[-1], 1e-12) / max(values[first], 1e-12)) / math.log(ns[-1] / ns[first])
                if len(ns) > 1 else 0.0)
    return a, b, exponent


def project(measured: dict[int, dict[str, float]], sample_bytes: float, sample_shards: int, pfs: float,
            node: float, net: float, gpus_per_node: int = 8) -> dict[int, dict[str, float]]:
    """ps_131k on hg38 at 8, 64 and 512 GPUs, from the measured per-unit costs and the stated bandwidths."""
    one = measured[min(measured)]
    hash_rate = sample_bytes / one["verify"]  # bytes per CPU-second per rank
    stat_cost = one["verify_cached"] / sample_shards
    ckpt = one["bytes"]
    ns = sorted(measured)
    agree_a, agree_b, _ = fit(ns, [measured[n]["agree"] for n in ns])
    loader_per_token = one["loader"] / STEP_TOKENS
    table = {}
    for gpus in (8, 64, 512):
        fs = min(pfs, node * max(1, gpus // gpus_per_node))  # what the job's nodes can draw from the file system
        table[gpus] = {
            # every rank hashes its share; together they cannot read faster than the file system
            "verify": max(HG38_SHARD_BYTES / gpus / hash_rate, HG38_SHARD_BYTES / fs),
            "verify_cached": HG38_SHARDS / gpus * stat_cost,
            # DCP: the ranks write shares of the checkpoint, then hash shares of it (read back)
            "save": 2 * ckpt / fs,
            # hash shares, rank 0 reads it once through its node, then broadcasts it
            "restore": ckpt / fs + ckpt / node + ckpt / net,
            "restore_v0.1": ckpt / fs + gpus * ckpt / fs,  # before: every rank read the whole file
            "agree_gloo_fit": agree_a + agree_b * gpus,  # an upper bound: see RESULTS.md
            "loader": loader_per_token * HG38_STEP_TOKENS / gpus,
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--genome-mbp", type=int, default=400, help="size of the random genome that is sharded")
    parser.add_argument("--pfs-gbps", type=float, default=20.0, help="parallel file system, aggregate GB/s")
    parser.add_argument("--node-gbps", type=float, default=2.0, help="one node's share of it, GB/s")
    parser.add_argument("--net-gbps", type=float, default=25.0, help="interconnect per node, GB/s (200 Gb/s)")
    parser.add_argument("--worker", nargs=2, metavar=("SHARDS", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker)), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shards = work / "shards"
        fasta = random_genome(work / "genome.fa", args.genome_mbp)
        subprocess.run([sys.executable, str(REPO / "data_prep" / "shard_genome.py"), "--fasta", str(fasta),
                        "--out", str(shards), "--contigs", "all", "--window", "8192", "--samples-per-shard", "512",
                        "--workers", "2", "--quiet"], check=True)
        manifest = json.loads((shards / "manifest.json").read_text())
        train = manifest["splits"]["train"]["shards"]
        sample_bytes, sample_shards = sum(s["bytes"] for s in train), len(train)
        measured = {n: run_ranks(n, str(shards), work) for n in args.ranks}
    ns = sorted(measured)
    print(f"measured on {os.cpu_count()} cores, {len(ns)} rank counts; dataset {sample_bytes / 1e6:.1f} MB in "
          f"{sample_shards} train shards; checkpoint {measured[ns[0]]['bytes'] / 1e6:.1f} MB (ps_131k, DDP)")
    header = f"{'cost':14} {'clock':5} " + " ".join(f"{n:>9} rk" for n in ns) + f" {'ratio':>7} {'exp':>5}  grows with"
    print(header)
    flagged = []
    for name, (clock, grows) in COSTS.items():
        values = [measured[n][name] for n in ns]
        _, _, exponent = fit(ns, values)
        flag = exponent > 1.1
        if flag:
            flagged.append(name)
        cells = " ".join(f"{v * 1e3:>9.2f}ms" if v < 1 else f"{v:>10.2f}s" for v in values)
        print(f"{name:14} {clock:5} {cells} {values[-1] / max(values[0], 1e-12):>6.2f}x {exponent:>5.2f}  {grows}"
              f"{'  <- faster than linear in ranks' if flag else ''}")
    print(f"flagged (exponent > 1.1): {', '.join(flagged) or 'none'}")
    print(f"\nprojection: ps_131k on hg38 ({HG38_SHARD_BYTES / 1e9:.0f} GB of shards, {HG38_SHARDS} shards), "
          f"parallel file system {args.pfs_gbps:g} GB/s in all, {args.node_gbps:g} GB/s per node, interconnect "
          f"{args.net_gbps:g} GB/s, 8 GPUs per node")
    table = project(measured, sample_bytes, sample_shards, args.pfs_gbps * 1e9, args.node_gbps * 1e9,
                    args.net_gbps * 1e9)
    print(f"{'cost':14} " + " ".join(f"{g:>10} GPUs" for g in table))
    for name in table[8]:
        print(f"{name:14} " + " ".join(f"{table[g][name]:>14.3f}s" for g in table))


if __name__ == "__main__":
    main()
