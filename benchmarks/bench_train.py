"""Training throughput on this machine: 1 rank vs 2 ranks (the baseline and the ratio = scaling efficiency).

    .venv/bin/python benchmarks/bench_train.py [--steps 12] [--sizes cpu_demo ps_1k] [--engine ddp]

For each model size it runs the real entry point (recipes/pretrain.py) on the embedded sample
shards, once as one process and once as 2 ranks under torchrun (gloo), with the same global batch,
then reads the per-step metrics back from TensorBoard and prints tokens/s (global and per rank),
the fraction of step time spent waiting on data, and scaling efficiency = tok/s(2) / (2 * tok/s(1)).
Each rank gets `--threads-per-rank` threads (default 1), so the 2-rank run uses twice the cores of
the 1-rank baseline and the efficiency measures what data parallelism loses (gradient all-reduce,
synchronisation, stragglers).
The first steps (start-up, allocator warm-up) are excluded from the averages.

GPU (run when a GPU exists; none on the CI machine): the same command with `--device cuda
--engine deepspeed --sizes ps_131k --tokens-per-step 131072 --steps 20 --shards data/shards/hg38`
reports tokens/s and peak memory for ps_131k at 131,072 tokens (1 and 2 GPUs); run it again with
`--override model.backend=torch` for the pure-PyTorch scan instead of the mamba-ssm kernels and
compare the two tables.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Per size: the recipe, and a global batch small enough for a CPU step of seconds (fixed length, fp32).
SIZES = {
    "cpu_demo": ("recipes/cpu_demo.yaml", ["data.curriculum.start_seq_len=null", "data.tokens_per_step=2048"]),
    "ps_1k": ("recipes/ps_1k.yaml", ["data.tokens_per_step=4096", "engine.precision=fp32"]),
    "ps_131k": ("recipes/ps_131k.yaml", []),  # GPU only: pass --tokens-per-step 131072 and a shards root
}
CPU_SIZES = ["cpu_demo", "ps_1k"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _read_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _average(results: list[dict[str, float]]) -> dict[str, float]:
    return {key: sum(r[key] for r in results) / len(results) for key in results[0]}


def run(size: str, ranks: int, args, shards: str, workdir: Path, tag: str = "a") -> dict[str, float]:
    recipe, extra = SIZES[size]
    run_dir = workdir / f"{size}_{ranks}r_{tag}"
    overrides = [f"run_dir={run_dir}", f"train.max_steps={args.steps}", f"engine.name={args.engine}",
                 f"engine.device={args.device}", "train.eval_batches=0", "checkpoint.every=0",
                 "checkpoint.resume=never", "logging.log_every=1000000", f"data.shards={shards}",
                 *extra, *args.override]
    if args.tokens_per_step:
        overrides.append(f"data.tokens_per_step={args.tokens_per_step}")
    script = [str(REPO / "recipes" / "pretrain.py"), "--config", str(REPO / recipe), *overrides]
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(ranks),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", *script]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_rank), DS_ACCELERATOR="cpu")
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"{size} at {ranks} rank(s) failed (rc {result.returncode}):\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    scalars = _read_scalars(run_dir)
    skip = min(args.warmup, args.steps - 1)

    def mean(tag):
        values = scalars[tag][skip:]
        return sum(values) / len(values)

    return {"tok_s": mean("perf/tokens_per_s"), "tok_s_dev": mean("perf/tokens_per_s_per_device"),
            "wait": mean("perf/data_wait_fraction"), "step_s": mean("perf/step_time_s"),
            "mem": max(scalars["perf/peak_memory_gib"]), "seq_len": scalars["data/seq_len"][-1],
            "tokens": scalars["data/global_batch"][-1] * scalars["data/seq_len"][-1],
            "final_loss": scalars["train/loss"][-1], "wall": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=CPU_SIZES, choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="initial steps left out of the averages")
    parser.add_argument("--engine", default="ddp", choices=["ddp", "fsdp2", "deepspeed"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads-per-rank", type=int, default=1,
                        help="CPU threads per rank (1: each rank owns one core, so 2 ranks use 2 cores)")
    parser.add_argument("--abba", action="store_true",
                        help="run 1 rank, 2 ranks, 2 ranks, 1 rank and average (for machines shared with other jobs)")
    parser.add_argument("--tokens-per-step", type=int, default=0, help="0: the recipe's value")
    parser.add_argument("--override", nargs="*", default=[], help="extra key=value overrides for every run")
    parser.add_argument("--shards", default=str(REPO / "data" / "shards" / "sample"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        rows = []
        for size in args.sizes:
            # ABBA order: load from other jobs that drifts during the benchmark biases neither side
            first_one, first_two = run(size, 1, args, args.shards, Path(tmp)), run(size, 2, args, args.shards, Path(tmp))
            runs = [(first_one, first_two)]
            if args.abba:
                second_two = run(size, 2, args, args.shards, Path(tmp), "b")
                runs.append((run(size, 1, args, args.shards, Path(tmp), "b"), second_two))
            rows.append((size, _average([r[0] for r in runs]), _average([r[1] for r in runs])))
    print(f"engine {args.engine}, device {args.device}, {args.threads_per_rank} CPU thread(s) per rank, "
          f"{args.steps} steps ({args.warmup} warm-up steps excluded)")
    print(f"{'size':<10}{'L':>7}{'tokens/step':>13}{'ranks':>6}{'tok/s':>11}{'tok/s/rank':>12}"
          f"{'s/step':>9}{'data wait':>11}{'peak GiB':>10}")
    for size, one, two in rows:
        for ranks, r in ((1, one), (2, two)):
            print(f"{size:<10}{r['seq_len']:>7.0f}{r['tokens']:>13,.0f}{ranks:>6}{r['tok_s']:>11,.0f}"
                  f"{r['tok_s_dev']:>12,.0f}{r['step_s']:>9.3f}{100 * r['wait']:>10.2f}%{r['mem']:>10.2f}")
        print(f"{size:<10} scaling efficiency 2 ranks vs 1 (ratio): {two['tok_s'] / (2 * one['tok_s']):.2f}"
              f"  (speed-up {two['tok_s'] / one['tok_s']:.2f}x)")


if __name__ == "__main__":
    main()
