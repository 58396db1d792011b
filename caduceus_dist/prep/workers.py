"""Workers of the sharder: one pool (threads or processes) shared by BGZF decompression and sample packing.

`ordered_map` keeps results in submission order with a bounded number of tasks in flight, so memory
stays bounded and the output cannot depend on how many workers there are or which finishes first.
With `pool=None` (`--workers 1`) the same tasks run inline.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context


def _process_pool(workers: int) -> Executor:
    # fork: workers inherit the imported modules; they start at the first submit, before any
    # progress-bar thread exists. Each task's payload is pickled through a pipe both ways.
    return ProcessPoolExecutor(workers, mp_context=get_context("fork"))


# threads: zlib and zstd release the GIL while they work (zstd once per run of samples), so threads use
# every core for the heavy parts with no copying between processes (benchmarks/bench_shard.py: processes
# cost more CPU and scale worse for the same output).
WORKER_KINDS: dict[str, Callable[[int], Executor]] = {"threads": ThreadPoolExecutor, "processes": _process_pool}


@contextlib.contextmanager
def worker_pool(workers: int, kind: str = "threads") -> Iterator[Executor | None]:
    """A pool of `workers` threads or processes (None for 1: everything runs inline)."""
    if kind not in WORKER_KINDS:
        raise ValueError(f"--worker-kind {kind!r} is unknown; choose one of {', '.join(WORKER_KINDS)}")
    if workers == 1:
        yield None
        return
    pool = WORKER_KINDS[kind](workers)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ordered_map(fn: Callable, tasks: Iterable, pool: Executor | None, depth: int) -> Iterator[tuple]:
    """Yield (task, fn(*task.args)) in task order with at most `depth` tasks in flight.

    If the task iterator itself fails (e.g. a truncated input), the tasks already submitted are still
    handed over first, so every shard that can be completed is kept, and then the error is raised.
    """
    if pool is None:
        for task in tasks:
            yield task, fn(*task.args)
        return
    pending: deque = deque()
    failure: Exception | None = None
    task_iter = iter(tasks)
    while True:
        try:
            task = next(task_iter)
        except StopIteration:
            break
        except Exception as exc:
            failure = exc
            break
        pending.append((task, pool.submit(fn, *task.args)))
        if len(pending) >= depth:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()
    if failure is not None:
        raise failure
