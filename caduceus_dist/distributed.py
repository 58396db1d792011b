"""The process group and the few collectives everything else uses, in one place.

Each helper is a no-op (identity) in a one-process run or before a group exists, so components can call
them unconditionally: the training loop, the checkpoint manager and the engines have one code path for
one rank and for many.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from caduceus_dist.errors import EXIT_OK, EXIT_PREEMPTED, ConfigError

REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


@dataclass
class DistContext:
    """Where this process sits. With context parallelism the world is a (dp, cp) mesh: the `cp_size`
    consecutive ranks of a CP group share sequences, each holding a slice of their positions."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cp_size: int = 1
    cp_group: Any = None  # the process group of this rank's CP group (None when cp_size is 1)

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(device: str = "auto", cp: int = 1) -> DistContext:
    """Join (or create) the process group; torchrun, the deepspeed launcher and plain python alike.

    A plain `python` run gets a one-process group too, so the training loop has a single code path.
    `device`: auto (CUDA when available) | cpu | cuda. `cp`: the context-parallel degree (engine.cp).
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        where = torch.device("cuda", local_rank)
    else:
        where = torch.device("cpu")
    if cp < 1 or world % cp:
        raise ConfigError(f"engine.cp={cp} does not divide the world size {world}: the ranks form data-parallel "
                          f"groups of engine.cp ranks that share sequences; use a divisor of {world}, or launch a "
                          "multiple of engine.cp processes")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    group = None
    if cp > 1:  # rows: data-parallel replicas; columns: the CP ranks of one replica (neighbours, same node)
        from torch.distributed.device_mesh import init_device_mesh

        group = init_device_mesh(where.type, (world // cp, cp), mesh_dim_names=("dp", "cp"))["cp"].get_group()
    return DistContext(rank, world, local_rank, where, cp, group)


def is_collective() -> bool:
    """True when there are other ranks to talk to."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this rank, number of ranks) of the job; (0, 1) without a process group of several ranks."""
    return (dist.get_rank(), dist.get_world_size()) if is_collective() else (0, 1)


def all_reduce_tensor(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a device tensor in place across ranks and return it, without reading it on the host."""
    if is_collective():
        dist.all_reduce(tensor, op=REDUCE_OPS[op])
    return tensor


def all_reduce(values: list, device: torch.device, op: str = "sum", dtype: torch.dtype = torch.float64) -> list:
    """One collective for several host scalars (float64 keeps token counts exact; int64 for flags and codes)."""
    return all_reduce_tensor(torch.tensor(values, dtype=dtype, device=device), op).tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (picklable objects)."""
    if not is_collective():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_collective():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_collective():
        dist.barrier()


def ranks_on_this_host() -> int:
    """Collective: how many ranks of the job run on this machine (any launcher, any host naming)."""
    hosts = gather_object(socket.gethostname())
    return hosts.count(socket.gethostname())


def choose_cpu_threads(ranks_here: int) -> tuple[int, str]:
    """Threads for this process's CPU work, and why: OMP_NUM_THREADS when the user set it, else the CPUs
    this process may run on (its affinity mask, which SLURM and taskset narrow) shared by the ranks on
    this host, so that ranks never oversubscribe the cores they were given."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    cpus = len(os.sched_getaffinity(0))
    return max(1, cpus // ranks_here), f"{cpus} CPU(s) available / {ranks_here} rank(s) on this host"


def exit_process(code: int) -> None:
    """Leave without running interpreter finalisation: a gloo thread can abort a clean ZeRO-3 exit under
    Python 3.11 (docs/environment.md §2), which would turn success into a crash code. After success or a
    preemption every rank got here, so they meet at a barrier first; a failing rank must not wait."""
    if dist.is_initialized():
        if code in (EXIT_OK, EXIT_PREEMPTED):
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
