"""CheckpointManager: when to save, how a save becomes a checkpoint atomically, and how a run resumes.

Every rank calls the same methods in the same order; the collectives below are the only ones the
manager issues, so they can never be mismatched with the engine's. A save:

1. all ranks write into `step_N.tmp/` (the engine its files, each rank its RNG file, rank 0 the
   trainer state and the config); a failure on any rank is agreed with one all-reduce and the
   partial directory is deleted, so the previous checkpoint and `latest` are untouched;
2. the files are hashed (and fsynced) in parallel, each rank taking a share;
3. rank 0 writes `manifest.json`, renames `step_N.tmp` to `step_N`, then moves `latest` (temp file +
   os.replace), then applies retention.

With `async_save`, step 1 writes to node-local memory (`async_staging_dir`) instead, and one thread per
node copies, hashes and fsyncs into `step_N.tmp/` while training goes on; step 3 runs at the first step
boundary where every node reports its copy finished (agreed in the same all-reduce as preemption).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from caduceus_dist.checkpoint import restore, rng
from caduceus_dist.checkpoint.config import CheckpointConfig
from caduceus_dist.checkpoint.manifest import (
    CHECKPOINTS,
    LATEST,
    MANIFEST,
    PREEMPTED,
    TMP_SUFFIX,
    build_manifest,
    clear_preemption,
    fsync_dirs,
    read_latest,
    record_preemption,
    relative_files,
    remove_tree,
    step_dir_name,
)
from caduceus_dist.checkpoint.preemption import INTERRUPT, NONE, PreemptionFlag
from caduceus_dist.checkpoint.retention import Retention
from caduceus_dist.checkpoint.staging import COPYING, DONE, FAILED, PendingSave, staging_dir
from caduceus_dist.distributed import all_reduce, barrier, broadcast_object, gather_object
from caduceus_dist.errors import EXIT_PREEMPTED
from caduceus_dist.fsio import atomic_write, balanced_shares, file_digest, fsync_path

log = logging.getLogger("caduceus_dist.checkpoint")

# Errors a full or failing disk produces: OSError from Python I/O, RuntimeError from torch.save's zip
# writer ("file write failed"), CheckpointException (a BaseException) from torch.distributed.checkpoint.
try:
    from torch.distributed.checkpoint.api import CheckpointException
except ImportError:  # pragma: no cover - very old torch
    CheckpointException = RuntimeError
WRITE_ERRORS = (OSError, RuntimeError, CheckpointException)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written and `checkpoint.on_write_error=stop`."""


class CheckpointSavesKeepFailing(CheckpointWriteError):
    """`checkpoint.max_failed_saves` saves in a row failed: stop, and let the scheduler requeue the job."""


class CheckpointManager:
    """Saves, retains and restores checkpoints of one run directory (see the module docstring)."""

    def __init__(self, job_cfg: Any, run_dir: Path | str, engine: Any):
        self.cfg: CheckpointConfig = job_cfg.checkpoint
        self.cfg.validate()
        self.engine = engine
        self.rank, self.world_size = engine.rank, engine.world_size
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.max_steps = int(job_cfg.train.max_steps)
        self.seed = int(job_cfg.train.seed)
        self.resolved_config = restore.plain_config(job_cfg)
        # the architecture only: runtime switches (kernel backend, activation checkpointing) may change on resume
        model = job_cfg.model
        self.model_config = model.to_hf_dict() if hasattr(model, "to_hf_dict") else restore.plain_config(model)
        self.config_hash = restore.hash_config(self.resolved_config)
        self.engine_config = restore.engine_settings(job_cfg.engine)
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.create(self.resolved_config))
        self._device = getattr(engine, "device", torch.device("cpu"))
        self._last_step: int | None = None  # step of the newest checkpoint on disk (written or resumed)
        self._pending: PendingSave | None = None
        self._stats: dict[str, float] = {}
        self._preempting = False
        self._failed_in_a_row = 0  # consecutive failed saves (checkpoint.max_failed_saves)
        self.retention = Retention(self.root, self.cfg.keep, self.cfg.keep_every)
        self.interrupted = False  # the agreed preemption was a Ctrl-C (exit EXIT_INTERRUPTED, do not requeue)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
        self._copies_for_node = self._is_first_rank_of_node() if self.cfg.async_save else False
        self.preemption = PreemptionFlag(list(self.cfg.preemption_signals))

    # ------------------------------------------------------------------ collectives
    def _all_reduce_max(self, values: list[int]) -> list[int]:
        return all_reduce(values, self._device, op="max", dtype=torch.int64)

    def _is_first_rank_of_node(self) -> bool:
        hosts = gather_object(socket.gethostname())
        return hosts.index(hosts[self.rank]) == self.rank

    # ------------------------------------------------------------------ training-loop API
    def after_step(self, step: int, client_state_fn: Callable[[], dict]) -> bool:
        """Called by every rank after optimizer step `step`; True means "saved, now exit EXIT_PREEMPTED"."""
        local_copy = DONE if self._pending is None else self._pending.state()
        preempt_flag, copy_state = self._all_reduce_max([self.preemption.code, local_copy])
        if self._pending is not None and copy_state != COPYING:
            self._finalize_pending(failed=copy_state == FAILED)
        preempted = preempt_flag > NONE
        self.interrupted = preempt_flag == INTERRUPT
        if preempted and self.preemption.requested:
            log.warning(
                "rank %d received %s; all ranks save at step %d and exit",
                self.rank, signal.Signals(self.preemption.received).name, step,
            )
        due = preempted or step >= self.max_steps or (self.cfg.every > 0 and step % self.cfg.every == 0)
        self._preempting = preempted
        if due and step != self._last_step:
            self.save(step, client_state_fn(), blocking=preempted or step >= self.max_steps)
        if preempted and not self.interrupted:
            self._record_stop(step, "preemption signal")
        return preempted

    def _record_stop(self, step: int, reason: str) -> None:
        """Rank 0 leaves the record a batch script requeues on (manifest.preemption_verdict)."""
        if self.rank != 0:
            return
        try:
            record_preemption(self.root, step, reason)
        except OSError as err:
            log.error("cannot write %s (%s): a batch script will not requeue this job by itself; resubmit "
                      "the same command to resume from %s", self.root / PREEMPTED, err, read_latest(self.root))

    def save(self, step: int, client_state: dict, blocking: bool | None = None) -> bool:
        """Collective save of `step`; False when the write failed (and `on_write_error=retry`)."""
        self.wait()
        state = {**client_state, "step": step}
        if blocking is None:
            blocking = not self.cfg.async_save
        try:
            if self.cfg.async_save and not blocking:
                return self._save_async(step, state)
            return self._save_sync(step, state)
        except KeyboardInterrupt:  # a second Ctrl-C mid-save: stop at once, leaving no half-written directory
            self._abandon(step)
            raise

    def _abandon(self, step: int) -> None:
        """Not collective: this rank removes what it owns of an unfinished save (the next start would too)."""
        if self.rank == 0:
            remove_tree(self._tmp_dir(step))
        if self._copies_for_node:
            shutil.rmtree(self._staging_dir(step), ignore_errors=True)

    def stats(self) -> dict[str, float]:
        """Figures of the newest save (for the metrics), returned once."""
        stats, self._stats = self._stats, {}
        return stats

    def wait(self) -> None:
        """Collective: block until an asynchronous save in flight (if any) is sealed or has failed."""
        if self._pending is None:
            return
        self._pending.join()
        (copy_state,) = self._all_reduce_max([self._pending.state()])
        self._finalize_pending(failed=copy_state == FAILED)

    def close(self) -> None:
        """Collective: finish an asynchronous save and any deletion, and give the preemption signals back."""
        self.wait()
        self.retention.join()
        self.preemption.close()

    # ------------------------------------------------------------------ saving
    def _write_local(self, directory: Path, state: dict) -> None:
        """This rank's part of a checkpoint: engine files, its RNG streams, and (rank 0) trainer state + config."""
        self.engine.save_checkpoint(directory)
        (directory / "rng").mkdir(exist_ok=True)
        # captured after the engine wrote, so a restored run draws exactly what the uninterrupted one draws next
        torch.save(rng.capture(), directory / "rng" / f"rank_{self.rank:05d}.pt")
        if self.rank == 0:
            torch.save(state, directory / "trainer_state.pt")
            (directory / "config.yaml").write_text(self.config_yaml)

    def _tmp_dir(self, step: int) -> Path:
        return self.root / (step_dir_name(step) + TMP_SUFFIX)

    def _prepare_tmp(self, step: int) -> Path:
        tmp = self._tmp_dir(step)
        if self.rank == 0:
            remove_tree(tmp)
            tmp.mkdir(parents=True)
        return tmp

    def _agree_write(self, step: int, error: str | None, tmp: Path) -> bool:
        """All ranks learn whether every rank wrote its part; on failure the partial directory goes."""
        (failed,) = self._all_reduce_max([int(error is not None)])
        if not failed:
            return True
        errors = [e for e in gather_object(error) if e]
        if self.rank == 0:
            remove_tree(tmp)
        self._write_failed(step, errors)
        return False

    def _save_sync(self, step: int, state: dict) -> bool:
        started = time.perf_counter()
        tmp = self._prepare_tmp(step)
        barrier()
        error = None
        try:
            self._write_local(tmp, state)
        except WRITE_ERRORS as exc:
            error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        if not self._agree_write(step, error, tmp):
            return False
        files = self._hash_shared(tmp)
        ok = self._commit(step, tmp, files)
        seconds = time.perf_counter() - started
        if ok:
            self._record(step, files, blocking_s=seconds, total_s=seconds)
        return ok

    def _hash_shared(self, tmp: Path) -> dict[str, dict]:
        """Hash and fsync every file of the new checkpoint, the ranks splitting the work."""
        sizes = broadcast_object({n: (tmp / n).stat().st_size for n in relative_files(tmp)} if self.rank == 0 else None)
        share = balanced_shares(sizes, self.world_size)[self.rank]
        mine = {name: file_digest(tmp / name, fsync=True).as_dict() for name in share}
        files: dict[str, dict] = {}
        for part in gather_object(mine):
            files.update(part)
        return files

    def _commit(self, step: int, tmp: Path, files: dict[str, dict]) -> bool:
        """Rank 0 seals the checkpoint: manifest, rename, `latest`, retention. Agreed by all ranks."""
        error = None
        if self.rank == 0:
            final = self.root / step_dir_name(step)
            try:
                manifest = build_manifest(
                    step=step, world_size=self.world_size, engine=self.engine_config, files=files,
                    config_hash=self.config_hash, model_config=self.model_config,
                )
                with open(tmp / MANIFEST, "w") as handle:
                    json.dump(manifest, handle, indent=1)
                    handle.flush()
                    os.fsync(handle.fileno())
                fsync_dirs(tmp)
                if final.exists():
                    log.warning("replacing %s (left by an earlier run that did not get past it)", final)
                    remove_tree(final)
                os.rename(tmp, final)
                fsync_path(self.root)
                try:
                    atomic_write(self.root / LATEST, final.name + "\n")
                except OSError:
                    remove_tree(final)  # `latest` could not move: the new checkpoint must not count
                    raise
            except OSError as exc:
                error = f"rank 0 sealing {final.name}: {type(exc).__name__}: {exc}"
                remove_tree(tmp)
        error = broadcast_object(error)
        if error is not None:
            self._write_failed(step, [error])
            return False
        self._last_step = step
        if self.rank == 0:
            self.retention.apply()
        return True

    def _free_space(self) -> str:
        """How much room there is where a save writes: torch.save reports a full disk as "unexpected pos"."""
        places = [(self.root, "on the filesystem of " + str(self.root))]
        if self.cfg.async_save:
            staging = Path(self.cfg.async_staging_dir)
            places.append((staging, f"in checkpoint.async_staging_dir {staging} (node-local memory: it must hold "
                                    "this node's share of a checkpoint; point it elsewhere or set async_save=false)"))
        parts = []
        for where, label in places:
            try:
                parts.append(f"{shutil.disk_usage(where).free / 1e6:.1f} MB free {label}")
            except OSError:
                parts.append(f"{where} unreachable")
        return "; ".join(parts)

    def _write_failed(self, step: int, errors: list[str]) -> None:
        latest = read_latest(self.root)
        self._failed_in_a_row += 1
        message = (
            f"checkpoint {step_dir_name(step)} could not be written under {self.root}: {'; '.join(errors)} "
            f"({self._free_space()}). The previous checkpoint ({latest or 'none'}) and `latest` are unchanged. "
            "Free disk space (or move run_dir) before the next save."
        )
        if self.cfg.on_write_error == "stop":
            raise CheckpointWriteError(message + " Stopping (checkpoint.on_write_error=stop); rerun the same "
                                       "command to resume from the previous checkpoint.")
        limit = self.cfg.max_failed_saves
        if limit and self._failed_in_a_row >= limit and not self._preempting:
            self._record_stop(step, f"{self._failed_in_a_row} checkpoint saves in a row failed")
            raise CheckpointSavesKeepFailing(
                message + f" {self._failed_in_a_row} saves in a row failed (checkpoint.max_failed_saves={limit}): "
                f"stopping with exit {EXIT_PREEMPTED} so that the job is requeued (after space is freed, or on a "
                f"healthy node) and resumes from {latest or 'the start'}.")
        if step >= self.max_steps:  # nothing later to retry with: succeeding now would lose the run's end
            raise CheckpointWriteError(message + " This was the final save, so there is no later one to retry: "
                                       "stopping with an error; rerun the same command to redo the steps since "
                                       f"{latest or 'the start'}.")
        if self.rank != 0:
            return
        if self._preempting:
            log.error("%s Exiting %d anyway: the requeued job resumes from %s.", message, EXIT_PREEMPTED,
                      latest or "the start")
        else:
            log.error("%s Training continues and retries at the next interval (checkpoint.on_write_error=retry).",
                      message)

    def _record(self, step: int, files: dict[str, dict], blocking_s: float, total_s: float) -> None:
        self._failed_in_a_row = 0
        total = sum(entry["bytes"] for entry in files.values())
        self._stats = {
            "checkpoint/step": float(step),
            "checkpoint/bytes": float(total),
            "checkpoint/blocking_s": blocking_s,
            "checkpoint/save_s": total_s,
        }
        if self.rank == 0:
            log.info(
                "saved checkpoint %s (%.1f MB, %d files) in %.2f s, training blocked %.2f s",
                self.root / step_dir_name(step), total / 1e6, len(files), total_s, blocking_s,
            )

    # ------------------------------------------------------------------ asynchronous saving
    def _staging_dir(self, step: int) -> Path:
        return staging_dir(self.cfg.async_staging_dir, self.run_dir, step)

    def _save_async(self, step: int, state: dict) -> bool:
        started = time.perf_counter()
        tmp = self._prepare_tmp(step)
        staging = self._staging_dir(step)
        if self._copies_for_node:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        error = None
        try:
            self._write_local(staging, state)
        except WRITE_ERRORS as exc:
            error = f"rank {self.rank} (staging in {staging}): {type(exc).__name__}: {exc}"
        barrier()  # every rank of the node has staged its files before the copy starts
        if not self._agree_write(step, error, tmp):
            if self._copies_for_node:
                shutil.rmtree(staging, ignore_errors=True)
            return False
        pending = PendingSave(step, tmp, staging, started, blocking_s=time.perf_counter() - started)
        if self._copies_for_node:
            pending.start_copy(self.rank)
        self._pending = pending
        self._stats = {"checkpoint/step": float(step), "checkpoint/blocking_s": pending.blocking_s}
        return True

    def _finalize_pending(self, failed: bool) -> None:
        pending, self._pending = self._pending, None
        reports = gather_object((pending.files, pending.error))
        if failed:
            if self.rank == 0:
                remove_tree(pending.tmp)
            self._write_failed(pending.step, [error for _, error in reports if error])
            return
        files: dict[str, dict] = {}
        for node_files, _ in reports:
            files.update(node_files or {})
        if self._commit(pending.step, pending.tmp, files):
            total_s = time.perf_counter() - pending.started
            self._record(pending.step, files, blocking_s=pending.blocking_s, total_s=total_s)

    # ------------------------------------------------------------------ resuming
    def resume(self) -> dict | None:
        """Collective: restore the newest valid checkpoint (per `checkpoint.resume`); None for a fresh start."""
        restore.remove_leftovers(self.root, self.rank)
        if self.rank == 0:  # a new attempt: the previous one's requeue decision is spent
            clear_preemption(self.root)
        if self._copies_for_node:  # staged copies of a crashed asynchronous save hold node memory
            shutil.rmtree(self._staging_dir(0).parent, ignore_errors=True)
        chosen = restore.select_checkpoint(self.root, self.cfg.resume, self.rank, self.world_size, self.cfg.verify)
        if chosen is None:
            return None
        path, manifest = chosen
        restore.check_compatible(path, manifest, self.model_config, self.resolved_config, self.config_hash, self.rank,
                                 self.engine_config)
        saved_world = int(manifest["world_size"])
        self.engine.load_checkpoint(path, saved_world)
        restore.restore_rng(path, manifest, self.rank, self.world_size, self.seed)
        state = torch.load(path / "trainer_state.pt", weights_only=True)
        self._last_step = int(manifest["step"])
        if self.rank == 0:
            log.info("resumed from %s (step %d, saved by %d rank(s), now %d)", path, self._last_step, saved_world,
                     self.world_size)
        return state
