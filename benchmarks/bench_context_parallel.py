"""Context parallelism: memory per rank, a 2^20-base step on 2 ranks, bytes moved, and the communication model.

    .venv/bin/python benchmarks/bench_context_parallel.py [--quick]

1. Memory. One forward+backward of a small Caduceus-PS (d_model 64, 1 layer, no activation checkpointing)
   at L = 2^18 on 1 rank (CP 1, the baseline) and split over 2 and 4 gloo ranks (CP 2, 4; real processes):
   the activations each rank keeps for backward (autograd's saved tensors, weights excluded) and its peak
   memory during the step (peak RSS minus RSS before it, glibc returning large buffers at once), and their
   ratios to CP 1.
2. 2^20 bases. One forward+backward of a PS model (d_model 16, 2 layers, activation checkpointing) at
   L = 2^20 with CP 2 against one process (CP 1, the baseline; one thread per process on this 2-core
   machine): wall time, memory per rank, and the bytes moved per layer, measured on the loopback
   interface (/proc/net/dev: every byte gloo sent, headers included) against the formula of
   docs/context-parallel.md §4, and the share of the step spent inside the collectives.
3. Model. Bytes per layer per token of all-to-all CP against state passing for recipes/ps_1m.yaml, and a
   projected ps_1m step on 8 H100s (assumptions printed with it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from rank_scripts import run_on_ranks  # noqa: E402  (the tests' launcher of gloo ranks: one copy of it)

RANK_SCRIPT = r'''
import json, os, resource, sys, time
import torch, torch.distributed as dist, torch.nn.functional as F
from caduceus_dist.engine.context_parallel import ChannelAllToAll, apply_context_parallel
from caduceus_dist.model import CaduceusConfig, CaduceusForMaskedLM

spec = json.loads(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
model = CaduceusForMaskedLM(CaduceusConfig(d_model=spec["d_model"], n_layer=spec["n_layer"], vocab_size=12, rcps=True,
                                           gradient_checkpointing=spec["checkpointing"]))
L = spec["length"]
generator = torch.Generator().manual_seed(1)
ids = torch.randint(7, 11, (1, L), generator=generator)
targets = torch.randint(7, 11, (1, L), generator=generator)
mine = slice(rank * L // world, (rank + 1) * L // world)
if world > 1:
    apply_context_parallel(model, ChannelAllToAll(dist.group.WORLD))

in_collectives, counted = [0.0], {"all_to_all": 0, "all_reduce": 0}
def timed(collective, name, sent_fraction):
    def call(tensor, *args, **kwargs):
        counted[name] += tensor.numel() * tensor.element_size() * sent_fraction
        start = time.perf_counter()
        try:
            return collective(tensor, *args, **kwargs)
        finally:
            in_collectives[0] += time.perf_counter() - start
    return call
# what one rank sends: (cp-1)/cp of an all-to-all's input (its output's size), 2 (cp-1)/cp of a ring all-reduce
dist.all_to_all_single = timed(dist.all_to_all_single, "all_to_all", (world - 1) / world)
dist.all_reduce = timed(dist.all_reduce, "all_reduce", 2 * (world - 1) / world)

def loopback_bytes():
    for line in open("/proc/net/dev"):
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[8])  # transmitted bytes
    return 0

def rss_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
saved = {}  # storage -> bytes of every tensor autograd keeps for backward (activations; weights excluded)
def pack(tensor):
    storage = tensor.untyped_storage()
    if storage.data_ptr() not in weights:
        saved[storage.data_ptr()] = storage.nbytes()
    return tensor

dist.barrier()
before_rss, before_net = rss_bytes(), loopback_bytes()
in_collectives[0] = 0.0
counted.update(all_to_all=0, all_reduce=0)
start = time.perf_counter()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
    logits = model(ids[:, mine])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, mine].reshape(-1), reduction="sum")
loss.backward()
wall = time.perf_counter() - start
dist.barrier()
sent = loopback_bytes() - before_net
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"rank": rank, "wall_s": wall, "step_bytes": peak - before_rss, "saved_bytes": sum(saved.values()),
                              "peak_rss_bytes": peak, "loopback_bytes": sent, "collective_s": in_collectives[0],
                              "counted": counted}))
'''


def run_ranks(spec: dict, world: int, port: int) -> list[dict]:
    # a fixed mmap threshold: glibc returns every large buffer at once, so peak RSS tracks live memory
    return run_on_ranks(RANK_SCRIPT, [json.dumps(spec)], port, world, cwd=REPO, timeout=3600,
                        env={"OMP_NUM_THREADS": str(spec["threads"]), "MALLOC_MMAP_THRESHOLD_": "1048576"})


def layer_bytes(d_model: int, length: int, cp: int, batch: int = 1, halves: int = 2, activation_bytes: int = 4,
                d_state: int = 16, expand: int = 2) -> dict[str, float]:
    """Bytes one rank sends per layer in one forward of the channel all-to-all scheme (docs/context-parallel.md
    §4): the x|z all-to-all, the fp32 sum of x_proj's partials (a ring all-reduce sends 2 (cp-1)/cp of it), and
    the all-to-all back. `halves`: 2 for PS (the RC half is a second input), 1 for Ph."""
    inner, rank = expand * d_model, math.ceil(d_model / 16)
    others = (cp - 1) / cp
    to_channels = halves * batch * (length / cp) * 2 * inner * activation_bytes * others
    partials = 2 * others * (2 * halves) * batch * length * (rank + 2 * d_state) * 4
    to_positions = halves * batch * length * (inner / cp) * activation_bytes * others
    return {"to_channels": to_channels, "x_proj_sum": partials, "to_positions": to_positions,
            "total": to_channels + partials + to_positions}


def state_passing_bytes(d_model: int, batch: int = 1, halves: int = 2, d_state: int = 16, d_conv: int = 4,
                        expand: int = 2) -> float:
    """Bytes per layer per rank boundary in one forward of state passing: each scan's fp32 (E, N) state one
    way and its conv halo (K-1 positions of E channels) the other way, for both directions of both halves."""
    inner = expand * d_model
    return 2 * halves * batch * (inner * d_state + (d_conv - 1) * inner) * 4


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="L = 2^16 and 2^18 instead of 2^18 and 2^20")
    args = parser.parse_args()
    from caduceus_dist.distributed import free_port

    print(f"machine: {os.cpu_count()} CPU(s), torch {__import__('torch').__version__}, gloo over loopback")

    # 1. memory at 2^18
    length = 2**16 if args.quick else 2**18
    spec = {"d_model": 64, "n_layer": 1, "length": length, "checkpointing": False, "threads": 1}
    print(f"\n1. activation memory per rank, PS d_model 64 x 1 layer, L = {length:,}, one forward+backward")
    base: dict[str, float] = {}
    for cp in (1, 2, 4):
        ranks = run_ranks(spec, cp, free_port())
        saved, step = (max(r[key] for r in ranks) for key in ("saved_bytes", "step_bytes"))
        base = base or {"saved": saved, "step": step}
        print(f"   CP {cp}: activations kept for backward {mib(saved)} per rank ({saved / base['saved']:.2f}x CP 1); "
              f"step peak over the start (RSS) {mib(step)} ({step / base['step']:.2f}x); {max(r['wall_s'] for r in ranks):.1f} s")

    # 2. a 2^20-base step at CP 2
    length = 2**18 if args.quick else 2**20
    spec = {"d_model": 16, "n_layer": 2, "length": length, "checkpointing": True, "threads": 1}
    print(f"\n2. PS d_model 16 x 2 layers, activation checkpointing, L = {length:,}, one forward+backward")
    alone = run_ranks(spec, 1, free_port())[0]
    print(f"   CP 1 (baseline, 1 process): wall {alone['wall_s']:.1f} s ({length / alone['wall_s']:,.0f} tokens/s), "
          f"step peak over the start {mib(alone['step_bytes'])}")
    ranks = run_ranks(spec, 2, free_port())
    wall = max(r["wall_s"] for r in ranks)
    print(f"   CP 2: {alone['wall_s'] / wall:.2f}x the speed of CP 1, {max(r['step_bytes'] for r in ranks) / alone['step_bytes']:.2f}x "
          "its step memory per rank")
    measured = sum(r["loopback_bytes"] for r in ranks) / 2 / 2 / spec["n_layer"]  # both ranks' counter: halve; per rank, per layer
    formula = layer_bytes(16, length, 2)
    # with checkpointing a layer runs forward twice (forward, recompute) and backward once, and backward moves
    # what forward moved (the opposite all-to-alls, the sum of the partials' gradients)
    expected = 3 * formula["total"]
    print(f"   wall {wall:.1f} s ({length / wall:,.0f} tokens/s), of which {max(r['collective_s'] for r in ranks):.1f} s "
          f"in collectives; activations kept {mib(max(r['saved_bytes'] for r in ranks))} and step peak over the start "
          f"{mib(max(r['step_bytes'] for r in ranks))} per rank, peak RSS "
          f"{mib(max(r['peak_rss_bytes'] for r in ranks))}")
    print(f"   bytes sent per layer per rank (forward, recompute, backward): measured on loopback {mib(measured)}, "
          f"formula {mib(expected)} -> measured/formula {measured / expected:.3f}; counted at the calls: "
          + ", ".join(f"{name} {mib(value / spec['n_layer'])}" for name, value in ranks[0]["counted"].items()))
    print(f"   formula, one forward: x|z all-to-all {mib(formula['to_channels'])}, x_proj partial sums "
          f"{mib(formula['x_proj_sum'])}, all-to-all back {mib(formula['to_positions'])}")

    # 3. the model for ps_1m
    d_model, n_layer, length, cp = 256, 16, 2**20, 8
    a2a = layer_bytes(d_model, length, cp, activation_bytes=2)  # bf16 activations; the partial sums stay fp32
    passing = state_passing_bytes(d_model)
    tokens = length / cp
    print(f"\n3. ps_1m (d_model {d_model}, {n_layer} layers, L 2^20, CP {cp}, bf16): one layer's forward, per rank")
    print(f"   all-to-all CP: {mib(a2a['total'])} = {a2a['total'] / tokens:,.0f} bytes per token of the rank "
          f"(x|z {mib(a2a['to_channels'])}, x_proj sums {mib(a2a['x_proj_sum'])}, back {mib(a2a['to_positions'])})")
    print(f"   state passing: {passing / 1024:,.1f} KiB per rank boundary = {passing / tokens:.3f} bytes per token "
          f"({a2a['total'] / passing:,.0f}x less), but a serial dependency between ranks or a second scan pass")
    per_step = 3 * a2a["total"] * n_layer  # forward, recompute, backward
    link = 360e9  # bytes/s one H100 sends in an NCCL all-to-all over NVLink 4 (450 GB/s per direction, ~80%)
    from caduceus_dist.model import CaduceusConfig, flops_per_token

    flops = flops_per_token(CaduceusConfig(d_model=d_model, n_layer=n_layer, vocab_size=12, rcps=True), length) * length
    peak, mfu = 989e12, 0.2
    compute = flops * (4 / 3) / (cp * peak * mfu)  # + the recomputed forward (activation checkpointing)
    print(f"   projected step (2^20 tokens on 8 H100s): communication {per_step / 2**30:.1f} GiB per GPU / "
          f"{link / 1e9:.0f} GB/s = {per_step / link:.2f} s; compute {flops * 4 / 3 / 1e12:,.0f} TFLOP / (8 x 989 TFLOP/s x "
          f"MFU {mfu}) = {compute:.2f} s; step ~{per_step / link + compute:.2f} s without overlap")
    print("   assumptions: NVLink 4 at 450 GB/s per direction and 80% all-to-all efficiency; MFU 0.2 for the Mamba "
          "kernels (unmeasured); collectives not overlapped with compute (they are not, today)")


if __name__ == "__main__":
    main()
