"""Moving batches from DataLoader worker processes to the training thread.

Workers build whole micro-batches as NumPy arrays (cheap to pickle through their pipe); one background
thread per stream receives them, widens tokens to int64 and pins them, a few batches ahead. Workers
ignore the job's signals (the trainer alone acts on Ctrl-C and preemption) and die with the trainer.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import queue
import signal
import sys
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from caduceus_dist.data.config import DataConfig
from caduceus_dist.shard_format import SOFTMASK_FLAG

PR_SET_PDEATHSIG = 1  # prctl option: the signal a process gets when its parent dies
# Ctrl-C, SLURM's forwarded USR2 and NCCL's USR1 reach every process of a job. SIGTERM is not among them:
# multiprocessing stops daemon workers with it at interpreter exit, and a worker that ignored it would hang
# that exit. A preemption by SIGTERM still saves: the trainer saves at the step boundary before it asks for
# another batch, so workers that die of it are never waited on.
JOB_SIGNALS = {signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2}


def worker_init(_worker_id: int) -> None:
    """The job's signals (JOB_SIGNALS) reach DataLoader workers too; only the trainer acts on them (it saves
    at the next step boundary), so a worker must not die of one. In return a worker must not outlive the
    trainer (which leaves with os._exit): Linux kills it then."""
    for signum in JOB_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)  # blocked from birth (see converted): now ignored
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def worker_loader(dataset: Dataset, sampler: Iterable, cfg: DataConfig, workers: int,
                  generator: torch.Generator) -> DataLoader:
    """The DataLoader both streams use: whole batches per item, `workers` processes set up by worker_init."""
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers, collate_fn=_keep,
                      generator=generator, prefetch_factor=cfg.prefetch_factor if workers else None,
                      worker_init_fn=worker_init,
                      multiprocessing_context=multiprocessing.get_context(cfg.worker_start_method) if workers else None)


def to_torch(batch: dict, pin: bool) -> dict:
    """numpy batch -> torch: tokens widened to int64 (numpy's cast: ~5x torch's here), pinned if asked.

    The targets' soft-mask flag (masking.py) becomes its own bool tensor, `target_softmasked`."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            if key == "targets":
                out["target_softmasked"] = _tensor(value >= SOFTMASK_FLAG, pin)
                value = value & np.uint8(SOFTMASK_FLAG - 1)
            value = _tensor(value.astype(np.int64, copy=value.dtype != np.int64), pin)
        out[key] = value
    return out


def _tensor(array: np.ndarray, pin: bool) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if pin else tensor


_END = object()


def converted(batches, cfg: DataConfig, depth: int) -> Iterator[dict]:
    """to_torch(batch) for each batch, done `depth` batches ahead in a background thread.

    Receiving from the workers, widening to int64 and pinning happen off the training thread (as
    DataLoader's own pin-memory thread would); numpy and pinning release the GIL. Errors raised
    while loading (e.g. a corrupt shard) are re-raised here, in order.
    """
    ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop, pin = threading.Event(), _pin(cfg)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        # Workers start from this thread and inherit its signal mask (through fork and exec alike), so a
        # signal that arrives before worker_init has run waits instead of killing a worker; the training
        # thread still receives every signal.
        signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        try:
            for batch in batches:
                if not put(to_torch(batch, pin)):
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            put(err)
        else:
            put(_END)

    thread = threading.Thread(target=produce, name="caduceus-data-convert", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # closed early (end of training, Ctrl-C): the producer drops the DataLoader, which stops its workers
        stop.set()
        thread.join(timeout=60)


def _keep(item):
    """collate_fn of our loaders: items are already whole batches, kept as numpy for the pipe."""
    return item


def _pin(cfg: DataConfig) -> bool:
    return cfg.pin_memory and torch.cuda.is_available()
